"""clidim-jax in napari: Denoise and Train widgets and sample data (manifest: `napari.yaml`).

`jobs` holds what the widgets run and imports neither napari nor Qt; `widgets` and
`sample_data` are imported by napari through the manifest. `import clidim_jax` never imports
this package.
"""
