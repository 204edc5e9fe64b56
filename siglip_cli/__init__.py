"""siglip: SigLIP image embeddings from a compact PyTorch vision tower.

The Python API behind the `siglip` command (see README.md, "Python API")::

    from siglip_cli.embed import load, embed_paths
    embedder = load("google/siglip-base-patch16-224")
    result = embed_paths(embedder, ["photos/"])
    result.embeddings  # (N, D) float32 numpy array, L2-normalized
"""

__version__ = "0.1.0"
