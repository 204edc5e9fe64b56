"""The timm pipeline a user would write instead of `siglip embed`: the second baseline for end-to-end timings.

    python bench/timm_embed.py WEIGHTS.safetensors IMAGE_DIR OUT.npy [--arch vit_base_patch16_siglip_224]
        [--batch-size 32] [--workers N]

What timm's documentation shows: `timm.create_model(arch, pretrained=True, num_classes=0)` (the pooled output of the
attention-pool head), the model's own transform from `resolve_model_data_config` + `create_transform`, and a
`DataLoader` with worker processes (default: CPUs − 1, as `siglip embed`). The rows are L2-normalized and saved.

Online a user would name a Hub checkpoint (`hf-hub:timm/ViT-B-16-SigLIP`); offline, and to time the same weights as
`siglip embed -m MODEL_DIR`, the weights come from a file in timm's layout, written once from a Hub-layout checkpoint:

    python bench/timm_embed.py --convert MODEL_DIR WEIGHTS.safetensors

timm's transform is not SigLIP's: it resizes the short side to 248 and crops the centre 224 (`crop_pct` 0.9), where
SigLIP squashes the whole photo to 224 × 224. The embeddings are close to ours, not equal; this script is for timing.
"""

import argparse
import os
from pathlib import Path

import numpy as np
import timm
import timm.data
import torch
from PIL import Image

SUFFIXES = {".jpg", ".jpeg", ".png"}


class Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


def convert(model_dir: str, out: str) -> None:
    """Write a Hub-layout SigLIP checkpoint's vision tower as a timm state dict (siglip's own key map)."""
    from safetensors.torch import save_file

    from siglip_cli.references import timm_state_dict
    from siglip_cli.checkpoints import resolve_checkpoint
    from siglip_cli.weights import load_model

    model = load_model(resolve_checkpoint(model_dir))  # unfused: the key map reads q/k/v
    save_file({key: t.contiguous() for key, t in timm_state_dict(model).items()}, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("weights")
    parser.add_argument("images")
    parser.add_argument("output", nargs="?")
    parser.add_argument("--arch", default="vit_base_patch16_siglip_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--convert", action="store_true", help="write MODEL_DIR's tower as timm weights to IMAGES")
    args = parser.parse_args()
    if args.convert:
        return convert(args.weights, args.images)

    overlay = {"file": str(Path(args.weights).resolve())}
    model = timm.create_model(args.arch, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in SUFFIXES)
    loader = torch.utils.data.DataLoader(Images(paths, transform), batch_size=args.batch_size,
                                         num_workers=args.workers)  # fmt: skip
    rows = []
    with torch.inference_mode():
        for pixels in loader:
            rows.append(torch.nn.functional.normalize(model(pixels), dim=-1).numpy())
    np.save(args.output, np.concatenate(rows))


if __name__ == "__main__":
    main()
