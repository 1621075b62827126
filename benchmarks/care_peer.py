"""The CARE row of `benchmarks/quality.py`: CAREamics (Noise2Void's successor toolbox; CARE is its
supervised U-Net) trained on the quality protocol's pairs, then predicting the test images.

Runs in its own virtual environment (torch and careamics never enter clidim-jax's install):

    python3 -m venv venv-care
    venv-care/bin/pip install careamics==0.3.5     # pulls torch (and its CUDA wheels)

    venv-care/bin/python benchmarks/care_peer.py --data OUT/data --workdir OUT/care \\
        --minutes 10 --out OUT/care_pred.npy

`--data` is the folder `quality.py` writes (train_noisy/, train_clean/, val_*/, test_*/, one TIFF
per field of view; a clean TIFF holds one image for all noisy frames of its field). CAREamics'
defaults are kept (U-Net depth 2 with 32 filters, MAE loss, Adam 1e-4 with ReduceLROnPlateau,
flips and quarter turns, its own mean/std normalisation, prediction with the checkpoint of
the best validation loss); we choose patch 64 and batch 16 (CAREamics requires both) and give
training `--minutes` of wall time (a Lightning Timer; epochs are not the limit).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import tifffile


def load(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    noisy, clean = [], []
    for name in sorted(os.listdir(os.path.join(folder, f"{split}_noisy"))):
        n = tifffile.imread(os.path.join(folder, f"{split}_noisy", name)).astype(np.float32)
        c = tifffile.imread(os.path.join(folder, f"{split}_clean", name)).astype(np.float32)
        n = n[None] if n.ndim == 2 else n
        noisy.append(n)
        clean.append(np.broadcast_to(c, n.shape).copy())
    return np.concatenate(noisy), np.concatenate(clean)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from careamics import CAREamist
    from careamics.config.factories.care_n2n_factory import create_care_config
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import Timer

    seed_everything(args.seed)
    os.makedirs(args.workdir, exist_ok=True)
    train_x, train_y = load(args.data, "train")
    val_x, val_y = load(args.data, "val")
    test_x, _ = load(args.data, "test")
    config = create_care_config(
        experiment_name="care_quality",
        data_type="array",
        axes="SYX",
        patch_size=[64, 64],
        batch_size=16,
        num_epochs=10_000,  # the Timer stops training
    )
    care = CAREamist(
        config,
        work_dir=args.workdir,
        callbacks=[Timer(duration={"seconds": int(args.minutes * 60)}, interval="step")],
        enable_progress_bar=False,
    )
    t0 = time.perf_counter()
    care.train(train_data=train_x, train_data_target=train_y, val_data=val_x,
               val_data_target=val_y)  # fmt: skip
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = care.predict(test_x, axes="SYX", data_type="array")
    if isinstance(pred, tuple):
        pred = pred[0]
    pred = np.asarray(pred if not isinstance(pred, list) else np.concatenate(
        [np.asarray(p).reshape(-1, *test_x.shape[1:]) for p in pred]), np.float32)  # fmt: skip
    pred = pred.reshape(test_x.shape)
    predict_s = time.perf_counter() - t0
    np.save(args.out, pred)
    epochs = int(care.trainer.current_epoch) if getattr(care, "trainer", None) else None
    info = {
        "train_s": train_s,
        "predict_s": predict_s,
        "epochs": epochs,
        "setting": f"CAREamics 0.3.5 defaults, patch 64, batch 16, {args.minutes:g} min "
        f"({epochs} epochs), best-validation checkpoint; torch {torch.__version__}",
    }
    with open(os.path.join(args.workdir, "care_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
