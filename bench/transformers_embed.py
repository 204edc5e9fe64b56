"""The transformers pipeline a user would write instead of `siglip embed`: the baseline for end-to-end timings.

    python bench/transformers_embed.py MODEL_DIR IMAGE_DIR OUT.npy [--batch-size 32] [--dtype float32|bfloat16]
        [--processor pil|auto]

Loads `SiglipVisionModel` (sdpa attention) and the checkpoint's image processor, embeds every image in IMAGE_DIR in
sorted order, L2-normalizes the pooled output and saves it. `--processor pil` (default) is `SiglipImageProcessorPil`,
the pixel-exact reference `siglip embed` matches; `auto` is what `AutoImageProcessor.from_pretrained` gives in
transformers 5, the torchvision backend: faster on the CPU, not pixel-exact (up to 2 levels apart). Compare with
`siglip embed IMAGE_DIR -m MODEL_DIR -o out.npy --batch-size 32`, timed with `/usr/bin/time -v`.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, SiglipImageProcessorPil, SiglipVisionModel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("images", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--processor", default="pil", choices=["pil", "auto"])
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    model = SiglipVisionModel.from_pretrained(args.model, attn_implementation="sdpa", dtype=dtype).eval()
    processor = (SiglipImageProcessorPil if args.processor == "pil" else AutoImageProcessor).from_pretrained(args.model)
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    rows = []
    with torch.inference_mode():
        for start in range(0, len(paths), args.batch_size):
            images = [Image.open(p) for p in paths[start : start + args.batch_size]]
            pixels = processor(images, return_tensors="pt")["pixel_values"].to(dtype)
            pooled = model(pixel_values=pixels).pooler_output.float()
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    np.save(args.output, np.concatenate(rows))


if __name__ == "__main__":
    main()
