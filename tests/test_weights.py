"""Checkpoints: finding the vision tower in every Hub layout, loading it strictly, reading pickles without running
them, serving Hub ids from an offline cache; and the config readers and presets behind them.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import (
    DEFAULT_REPO_ID,
    DEFAULT_REVISION,
    INDEX_NAME,
    PICKLE_INDEX_NAME,
    PICKLE_NAME,
    WEIGHTS_NAME,
    HubCache,
    save_as_pickles,
    save_booby_trapped_pickle,
)
from siglip_cli.checkpoints import CheckpointError, resolve_checkpoint
from siglip_cli.config import (
    PRESETS,
    ConfigError,
    PreprocessConfig,
    VisionConfig,
    preprocess_config_from_hub,
    vision_config_from_hub,
)
from siglip_cli.errors import UserError
from siglip_cli.model import SiglipVision, num_parameters
from siglip_cli.weights import load_model, read_vision_tensors

PREFIXES = {
    "tiny_siglip": "vision_model.",
    "tiny_vision": "",
    "tiny_vision_legacy": "vision_model.",
    "tiny_sharded": "vision_model.",
    "tiny_paligemma": "vision_tower.vision_model.",
    "tiny_paligemma_new_layout": "model.vision_tower.vision_model.",
    "tiny_paligemma_v5_layout": "vision_tower.",
}


def copy_checkpoint(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def rewrite_tensors(checkpoint: Path, change) -> None:
    """Apply `change(tensors)` (in place) to a single-file checkpoint."""
    tensors = load_file(checkpoint / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, checkpoint / WEIGHTS_NAME)


def expected_keys(checkpoint: Path) -> set[str]:
    with torch.device("meta"):
        return set(SiglipVision(resolve_checkpoint(str(checkpoint)).vision).state_dict())


# ---------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", list(PREFIXES))
def test_vision_tower_is_found_in_every_hub_layout(name: str, request: pytest.FixtureRequest) -> None:
    assert resolve_checkpoint(str(request.getfixturevalue(name))).prefix == PREFIXES[name]


@pytest.mark.parametrize("name", ["tiny_siglip", "tiny_paligemma_v5_layout", "tiny_paligemma_new_layout"])
def test_only_the_vision_tensors_are_read(name: str, request: pytest.FixtureRequest) -> None:
    checkpoint = request.getfixturevalue(name)  # these files also hold a text tower or a language model
    tensors = read_vision_tensors(resolve_checkpoint(str(checkpoint)))
    assert set(tensors) == expected_keys(checkpoint)


def test_paligemma_checkpoint_opens_only_its_vision_shard(tiny_paligemma: Path) -> None:
    checkpoint = resolve_checkpoint(str(tiny_paligemma))
    assert checkpoint.weight_files == (tiny_paligemma / "model-00002-of-00002.safetensors",)


def test_sharded_checkpoint_opens_only_shards_with_vision_tensors(tiny_sharded: Path) -> None:
    weight_map = json.loads((tiny_sharded / INDEX_NAME).read_text())["weight_map"]
    vision_shards = {shard for key, shard in weight_map.items() if key.startswith("vision_model.")}
    assert vision_shards < set(weight_map.values())  # some shards hold only the text tower
    checkpoint = resolve_checkpoint(str(tiny_sharded))
    assert {file.name for file in checkpoint.weight_files} == vision_shards


def test_sharded_checkpoint_loads_every_vision_tensor(tiny_sharded: Path) -> None:
    model = load_model(resolve_checkpoint(str(tiny_sharded)))
    with safe_open(tiny_sharded / "model-00005-of-00005.safetensors", "pt") as last:
        key = next(k for k in last.keys() if k.startswith("vision_model."))
        stored = last.get_tensor(key)
    assert torch.equal(model.state_dict()[key.removeprefix("vision_model.")], stored)


def test_paligemma_config_without_image_size_means_224(tiny_paligemma_default_size: Path) -> None:
    checkpoint = resolve_checkpoint(str(tiny_paligemma_default_size))
    assert (checkpoint.vision.image_size, checkpoint.vision.patch_size) == (224, 14)
    assert checkpoint.vision.vision_use_head is False
    assert (checkpoint.preprocess.height, checkpoint.preprocess.width) == (224, 224)


def test_loaded_model_is_in_eval_mode_without_gradients(tiny_vision: Path) -> None:
    model = load_model(resolve_checkpoint(str(tiny_vision)))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


# ---------------------------------------------------------------------------------- strict loading


def test_missing_tensor_is_named_in_the_error(tiny_vision: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_vision, tmp_path / "ckpt")
    rewrite_tensors(checkpoint, lambda t: t.pop("post_layernorm.bias"))
    with pytest.raises(CheckpointError, match=r"is missing tensor post_layernorm\.bias\."):
        load_model(resolve_checkpoint(str(checkpoint)))


def test_several_missing_tensors_are_counted(tiny_vision: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_vision, tmp_path / "ckpt")
    rewrite_tensors(checkpoint, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("head.")]])
    with pytest.raises(CheckpointError, match=r"is missing tensor head\.\S+ \(and \d+ more\)"):
        load_model(resolve_checkpoint(str(checkpoint)))


def test_mis_shaped_tensor_is_named_with_both_shapes(tiny_vision: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_vision, tmp_path / "ckpt")
    rewrite_tensors(checkpoint, lambda t: t.update({"post_layernorm.weight": torch.ones(33)}))
    with pytest.raises(
        CheckpointError, match=r"tensor post_layernorm\.weight has shape \[33\] but the config needs \[32\]"
    ):
        load_model(resolve_checkpoint(str(checkpoint)))


def test_unexpected_tensor_is_named_in_the_error(tiny_vision: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_vision, tmp_path / "ckpt")
    rewrite_tensors(checkpoint, lambda t: t.update({"head.extra_scale": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"has unexpected tensor head\.extra_scale"):
        load_model(resolve_checkpoint(str(checkpoint)))


@pytest.mark.parametrize(
    "extra",
    [
        {"adapter.lora_A.weight": torch.ones(4, 32)},  # beside a tower saved without a prefix
        {"embeddings.position_ids": torch.arange(16)[None]},  # the buffer older transformers saved
    ],
    ids=["outside the tower", "position_ids"],
)
def test_tensors_transformers_ignores_are_ignored(tiny_vision: Path, tmp_path: Path, extra: dict) -> None:
    checkpoint = copy_checkpoint(tiny_vision, tmp_path / "ckpt")
    rewrite_tensors(checkpoint, lambda t: t.update(extra))
    loaded = load_model(resolve_checkpoint(str(checkpoint))).state_dict()
    reference = load_model(resolve_checkpoint(str(tiny_vision))).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_head_tensors_of_a_headless_config_are_ignored(tiny_vision: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_vision, tmp_path / "ckpt")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "vision_use_head": False}))
    model = load_model(resolve_checkpoint(str(checkpoint)))
    assert model.head is None and not any(k.startswith("head.") for k in model.state_dict())


def corrupt(checkpoint: Path, how: str) -> None:
    weights = checkpoint / WEIGHTS_NAME
    if how == "git lfs pointer":
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123456\n")
    elif how == "empty":
        weights.write_bytes(b"")
    else:  # an interrupted download
        weights.write_bytes(weights.read_bytes()[:-100])


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("git lfs pointer", r"model\.safetensors is a Git LFS pointer, not the weights: run `git lfs pull`"),
        ("empty", r"model\.safetensors is not a readable safetensors file \(damaged or incomplete download\)"),
        ("truncated", r"model\.safetensors is not a readable safetensors file \(damaged or incomplete download\)"),
    ],
)
def test_broken_weights_file_is_one_sentence_naming_it(tiny_vision: Path, tmp_path: Path, how: str, message: str) -> None:
    checkpoint = copy_checkpoint(tiny_vision, tmp_path / "ckpt")
    corrupt(checkpoint, how)
    with pytest.raises(CheckpointError, match=message):
        load_model(resolve_checkpoint(str(checkpoint)))


def test_weights_file_the_user_may_not_read_gives_the_systems_reason(
    tiny_vision: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model.safetensors of mode 0600 (transformers' default) owned by another user: safetensors says "No such
    # file or directory", and we said the file was damaged. Simulated, since the tests may run as root.
    import builtins

    from safetensors import SafetensorError

    import siglip_cli.checkpoints as checkpoints_module

    checkpoint = copy_checkpoint(tiny_vision, tmp_path / "ckpt")
    locked = checkpoint / "model.safetensors"

    def no_such_file(path, *args, **kwargs):
        raise SafetensorError("No such file or directory: model.safetensors")

    def denied(path, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints_module, "safe_open", no_such_file)
    monkeypatch.setattr(checkpoints_module, "open", denied, raising=False)
    with pytest.raises(CheckpointError, match=rf"^cannot read {locked}: Permission denied\.$"):
        load_model(resolve_checkpoint(str(checkpoint)))


@pytest.mark.parametrize("name", ["", " "])
def test_an_empty_model_name_is_refused(name: str) -> None:
    with pytest.raises(CheckpointError, match="the model name is empty"):  # was read as the current folder
        resolve_checkpoint(name)


def test_broken_shard_is_one_sentence_naming_it(tiny_sharded: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_sharded, tmp_path / "ckpt")
    shard = sorted(checkpoint.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is not a readable safetensors file"):
        load_model(resolve_checkpoint(str(checkpoint)))


def test_checkpoint_folder_whose_name_is_not_utf8_is_one_sentence(tiny_vision: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_vision, Path(os.fsdecode(os.fsencode(tmp_path) + b"/ck\xe9")))
    with pytest.raises(CheckpointError, match="safetensors cannot open a path that is not valid UTF-8; rename the folder"):
        resolve_checkpoint(str(checkpoint))


def test_single_file_beside_a_stale_index_wins_as_in_transformers(
    tiny_sharded: Path, tiny_siglip: Path, tmp_path: Path
) -> None:
    # A folder re-saved unsharded in place: transformers deletes the old shards but leaves their index behind.
    checkpoint = copy_checkpoint(tiny_sharded, tmp_path / "ckpt")
    for shard in checkpoint.glob("model-*.safetensors"):
        shard.unlink()
    shutil.copy(tiny_siglip / WEIGHTS_NAME, checkpoint / WEIGHTS_NAME)
    shutil.copy(tiny_siglip / "config.json", checkpoint / "config.json")
    resolved = resolve_checkpoint(str(checkpoint))
    assert resolved.weight_files == (checkpoint / WEIGHTS_NAME,)
    plain = load_model(resolve_checkpoint(str(tiny_siglip)))
    assert all(torch.equal(a, b) for a, b in zip(load_model(resolved).state_dict().values(), plain.state_dict().values()))


def test_index_without_weight_map_is_refused(tiny_sharded: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_sharded, tmp_path / "ckpt")
    (checkpoint / INDEX_NAME).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="has no weight_map"):
        resolve_checkpoint(str(checkpoint))


# ------------------------------------------------------------------------------------------ pickles
# Many fine-tunes on the Hub ship only pytorch_model.bin. transformers 5 loads it through torch's restricted unpickler
# (torch.load weights_only=True), which builds tensors and refuses to call anything else: so do we.


def assert_same_weights(model: SiglipVision, reference: SiglipVision) -> None:
    loaded, expected = model.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("name", ["tiny_vision", "tiny_siglip"])
def test_pickle_only_checkpoint_loads_the_weights_of_its_safetensors_twin(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    checkpoint = request.getfixturevalue(name)  # bare names, and vision_model. beside a text tower
    pickled = save_as_pickles(checkpoint, tmp_path / "pickled")
    resolved = resolve_checkpoint(str(pickled))
    assert (resolved.weight_files, resolved.prefix) == ((pickled / PICKLE_NAME,), PREFIXES[name])
    assert_same_weights(load_model(resolved), load_model(resolve_checkpoint(str(checkpoint))))


def test_sharded_pickle_checkpoint_loads_from_the_shards_with_vision_tensors(tiny_sharded: Path, tmp_path: Path) -> None:
    pickled = save_as_pickles(tiny_sharded, tmp_path / "pickled")
    weight_map = json.loads((pickled / PICKLE_INDEX_NAME).read_text())["weight_map"]
    vision_shards = {shard for key, shard in weight_map.items() if key.startswith("vision_model.")}
    assert vision_shards < set(weight_map.values())  # some shards hold only the text tower
    resolved = resolve_checkpoint(str(pickled))
    assert {file.name for file in resolved.weight_files} == vision_shards
    assert_same_weights(load_model(resolved), load_model(resolve_checkpoint(str(tiny_sharded))))


def test_pickle_in_torchs_format_before_zip_loads(tiny_vision: Path, tmp_path: Path) -> None:
    # torch < 1.6 wrote no zip, which torch.load cannot memory-map: it is read whole instead.
    pickled = save_as_pickles(tiny_vision, tmp_path / "pickled", _use_new_zipfile_serialization=False)
    assert_same_weights(load_model(resolve_checkpoint(str(pickled))), load_model(resolve_checkpoint(str(tiny_vision))))


def test_safetensors_beside_a_pickle_win_as_in_transformers(tiny_vision: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_vision, tmp_path / "both")
    torch.save({key: value * 2 for key, value in load_file(checkpoint / WEIGHTS_NAME).items()}, checkpoint / PICKLE_NAME)
    resolved = resolve_checkpoint(str(checkpoint))
    assert resolved.weight_files == (checkpoint / WEIGHTS_NAME,)
    assert_same_weights(load_model(resolved), load_model(resolve_checkpoint(str(tiny_vision))))


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch.save", "plain pickle"])
def test_booby_trapped_pickle_really_runs_code_when_unpickled(tmp_path: Path, torch_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = save_booby_trapped_pickle(tmp_path / "model.bin", marker, torch_format=torch_format)
    torch.load(path, weights_only=False) if torch_format else pickle.loads(path.read_bytes())
    assert marker.exists()  # so the tests below would notice an unpickling


@pytest.mark.parametrize(
    ("torch_format", "why"),
    [
        (True, rf"its pickle calls {open.__module__}\.open, which torch's weights-only loader refuses since it could run any code"),
        (False, r"torch's weights-only loader cannot read it \(Unsupported operand \d+\)"),  # pickle protocol 4's FRAME
    ],
    ids=["torch.save", "plain pickle"],
)  # fmt: skip
def test_pickle_that_would_run_code_is_refused_in_one_sentence_and_never_run(
    tiny_vision: Path, tmp_path: Path, torch_format: bool, why: str
) -> None:
    checkpoint = save_as_pickles(tiny_vision, tmp_path / "pickled")
    marker = tmp_path / "pwned"
    save_booby_trapped_pickle(checkpoint / PICKLE_NAME, marker, torch_format=torch_format)
    with pytest.raises(CheckpointError, match=rf"^{checkpoint / PICKLE_NAME} is not a plain tensor checkpoint: {why}\.$"):
        load_model(resolve_checkpoint(str(checkpoint)))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("git lfs pointer", r"pytorch_model\.bin is a Git LFS pointer, not the weights: run `git lfs pull`"),
        ("empty", r"pytorch_model\.bin is not a readable PyTorch checkpoint \(damaged or incomplete download\): "),
        ("truncated", r"pytorch_model\.bin is not a readable PyTorch checkpoint \(damaged or incomplete download\): "),
        ("a training state", r"pytorch_model\.bin is not a plain tensor checkpoint: its entry 'epoch' is not a tensor \(int\)\.$"),
        ("one tensor", r"pytorch_model\.bin is not a plain tensor checkpoint: it holds a Tensor, not tensors by name"),
    ],
)
def test_broken_pickle_is_one_sentence_naming_it(tiny_vision: Path, tmp_path: Path, how: str, message: str) -> None:
    checkpoint = save_as_pickles(tiny_vision, tmp_path / "pickled")
    weights = checkpoint / PICKLE_NAME
    if how == "git lfs pointer":
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123456\n")
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "truncated":  # an interrupted download
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "a training state":  # what weights_only loads, but not a state dict
        torch.save({"epoch": 3, "state_dict": torch.load(weights, weights_only=True)}, weights)
    else:
        torch.save(torch.zeros(3), weights)
    with pytest.raises(CheckpointError, match=message):
        load_model(resolve_checkpoint(str(checkpoint)))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".PT", ".safetensors"])
def test_weights_file_given_as_model_is_refused_in_favour_of_its_folder(suffix: str, tmp_path: Path) -> None:
    # The tower's shape is in config.json beside it: a .bin alone is refused as a .safetensors alone is, unread.
    marker = tmp_path / "pwned"
    path = save_booby_trapped_pickle(tmp_path / f"model{suffix}", marker)
    with pytest.raises(CheckpointError, match="is a file; pass the checkpoint directory that holds config.json instead"):
        resolve_checkpoint(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_checkpoint_folder_named_like_a_pickle_file_loads(suffix: str, tiny_vision: Path, tmp_path: Path) -> None:
    # `runs/epoch3.ckpt/` is a folder in the Hub layout, as transformers loads it: it was refused as a pickle file.
    checkpoint = copy_checkpoint(tiny_vision, tmp_path / f"run{suffix}")
    assert_same_weights(load_model(resolve_checkpoint(str(checkpoint))), load_model(resolve_checkpoint(str(tiny_vision))))


def test_hub_id_with_only_pickles_loads_from_the_cache(hf_cache: HubCache, tiny_siglip: Path, tmp_path: Path) -> None:
    snapshot = hf_cache(save_as_pickles(tiny_siglip, tmp_path / "pickled"), absent=[WEIGHTS_NAME, INDEX_NAME])
    checkpoint = resolve_checkpoint(DEFAULT_REPO_ID)
    assert checkpoint.weight_files == (snapshot / PICKLE_NAME,)
    assert_same_weights(load_model(checkpoint), load_model(resolve_checkpoint(str(tiny_siglip))))


def test_hub_pickles_cached_without_asking_about_safetensors_load_offline_as_transformers_loads_them(
    hf_cache: HubCache, tiny_siglip: Path, tmp_path: Path
) -> None:
    # A cache filled by `hf download repo pytorch_model.bin` never asked the Hub for model.safetensors: offline,
    # transformers loads the pickle, and the run was refused ("connect once").
    snapshot = hf_cache(save_as_pickles(tiny_siglip, tmp_path / "pickled"))
    checkpoint = resolve_checkpoint(DEFAULT_REPO_ID)
    assert checkpoint.weight_files == (snapshot / PICKLE_NAME,)
    assert_same_weights(load_model(checkpoint), load_model(resolve_checkpoint(str(tiny_siglip))))


def test_a_hub_id_with_no_weights_cached_offline_names_the_safetensors_file(hf_cache: HubCache, tiny_siglip: Path) -> None:
    snapshot = hf_cache(tiny_siglip)
    (snapshot / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME} of {DEFAULT_REPO_ID} is not in the local Hugging Face"):
        resolve_checkpoint(DEFAULT_REPO_ID)


# -------------------------------------------------------------------------------- Hub ids, offline


def test_hub_id_is_served_from_the_offline_cache(hf_cache: HubCache, tiny_siglip: Path) -> None:
    snapshot = hf_cache(tiny_siglip)
    checkpoint = resolve_checkpoint(DEFAULT_REPO_ID)
    assert checkpoint.name == DEFAULT_REPO_ID and checkpoint.revision == DEFAULT_REVISION
    assert checkpoint.weight_files == (snapshot / WEIGHTS_NAME,)
    cached, local = load_model(checkpoint), load_model(resolve_checkpoint(str(tiny_siglip)))
    assert all(torch.equal(cached.state_dict()[k], v) for k, v in local.state_dict().items())


def test_hub_id_needs_only_the_vision_shard_in_the_cache(hf_cache: HubCache, tiny_paligemma: Path) -> None:
    snapshot = hf_cache(tiny_paligemma, repo_id="google/paligemma-tiny")
    (snapshot / "model-00001-of-00002.safetensors").unlink()  # the language model: never downloaded
    checkpoint = resolve_checkpoint("google/paligemma-tiny")
    assert checkpoint.weight_files == (snapshot / "model-00002-of-00002.safetensors",)
    assert load_model(checkpoint).head is None


def test_hub_id_missing_from_the_offline_cache_fails_naming_it_without_trying_the_network(
    hf_cache: HubCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fast, counted rather than timed: huggingface_hub's retries of an unreachable Hub took ~26 s.
    import socket

    connections = []
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: connections.append(address) or 1 / 0)
    with pytest.raises(CheckpointError, match=r"google/siglip-not-cached is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_checkpoint("google/siglip-not-cached")
    assert connections == []


@pytest.fixture
def online(hf_cache: HubCache, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The cache of `hf_cache` with HF_HUB_OFFLINE unset, and every connection the probe opens refused and recorded
    (no test may touch the network)."""
    import huggingface_hub.constants as hub_constants
    import socket

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    probes = []

    def refuse(address, timeout=None):
        probes.append(address)
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return probes


def test_hub_id_not_cached_on_a_machine_without_network_fails_at_once(
    online: list[tuple], monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub alone would retry the unreachable Hub for ~26 s, printing a warning per retry.
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("went to the Hub"))
    with pytest.raises(CheckpointError, match=r"google/siglip-not-cached is not in the local Hugging Face cache"):
        resolve_checkpoint("google/siglip-not-cached")
    assert online == [("huggingface.co", 443)]


def test_hub_id_in_the_cache_loads_offline_without_asking_the_hub_for_what_it_lacks(
    online: list[tuple], hf_cache: HubCache, tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A single-file model cached by another tool: the optional shard index is not in the cache, and
    # huggingface_hub would retry the unreachable Hub for it for ~26 s before giving up.
    import huggingface_hub

    snapshot = hf_cache(tiny_siglip)
    asked = []

    def from_cache(repo_id: str, filename: str, revision: str | None) -> str:
        asked.append(filename)
        return str(snapshot / filename)  # what huggingface_hub serves offline for a cached file

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_cache)
    checkpoint = resolve_checkpoint(DEFAULT_REPO_ID)
    assert checkpoint.revision == DEFAULT_REVISION
    assert asked == ["config.json", "preprocessor_config.json", WEIGHTS_NAME]
    assert online == []  # the weights file is cached, so the optional shard index is never asked for


def test_a_cached_processor_config_comes_first_as_in_transformers(tiny_siglip: Path, tmp_path: Path, hf_cache) -> None:
    import json
    import shutil

    saved_over = tmp_path / "saved-over"
    shutil.copytree(tiny_siglip, saved_over)
    settings = json.loads((saved_over / "preprocessor_config.json").read_text())
    (saved_over / "processor_config.json").write_text(json.dumps({"image_processor": {**settings, "resample": 2}}))
    hf_cache(saved_over)
    checkpoint = resolve_checkpoint(DEFAULT_REPO_ID)
    assert (checkpoint.preprocess.resample, checkpoint.preprocess_source) == (2, "processor_config.json")


def test_a_revision_for_a_local_folder_is_refused_not_ignored(tiny_siglip: Path) -> None:
    with pytest.raises(CheckpointError, match=r"is a local folder: a revision \(v2\) applies only to Hub ids"):
        resolve_checkpoint(str(tiny_siglip), revision="v2")


def test_hub_revision_that_is_not_cached_fails_naming_id_and_revision(hf_cache: HubCache, tiny_siglip: Path) -> None:
    hf_cache(tiny_siglip)  # main is cached, v2 is not
    with pytest.raises(CheckpointError, match=rf"{DEFAULT_REPO_ID} at revision 'v2' is not in the local Hugging Face"):
        resolve_checkpoint(DEFAULT_REPO_ID, revision="v2")


# ------------------------------------------------------------------------------- what is not a model


def write_config(directory: Path, config: dict) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_siglip2_naflex_config_is_refused_with_a_sentence(tmp_path: Path) -> None:
    checkpoint = write_config(tmp_path / "naflex", {"model_type": "siglip2", "vision_config": {}})
    with pytest.raises(ConfigError, match=r"model_type 'siglip2'.* not supported") as error:
        resolve_checkpoint(str(checkpoint))
    assert isinstance(error.value, UserError)


@pytest.mark.parametrize("name", ["tiny_vision", "tiny_siglip"])  # the tower's fields at the top, or in vision_config
@pytest.mark.parametrize("missing", ["absent", "null"])
def test_config_without_model_type_is_read_as_siglip_vision_model_reads_it(
    name: str, missing: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Hand-written and converted configs leave model_type out: SiglipVisionModel.from_pretrained loads them, and we
    # said "model_type None is not a SigLIP vision tower".
    original = request.getfixturevalue(name)
    checkpoint = copy_checkpoint(original, tmp_path / "ckpt")
    config = json.loads((checkpoint / "config.json").read_text())
    assert config.pop("model_type") in ("siglip", "siglip_vision_model")
    (checkpoint / "config.json").write_text(json.dumps(config if missing == "absent" else {**config, "model_type": None}))
    resolved, reference = resolve_checkpoint(str(checkpoint)), resolve_checkpoint(str(original))
    assert resolved.vision == reference.vision
    assert_same_weights(load_model(resolved), load_model(reference))


@pytest.mark.parametrize(
    "config",
    [{}, {"hidden_size": 768, "vocab_size": 32000}, {"text_config": {}, "patch_size": 16}],
    ids=["empty", "a text model", "beside a text_config"],
)
def test_config_without_model_type_that_describes_no_tower_is_refused(config: dict) -> None:
    # SiglipVisionConfig's defaults would make any of them a B/16 tower at 224 px.
    refusal = r"^config\.json has no model_type, and neither a vision_config nor a vision tower's patch_size or image_size\.$"
    with pytest.raises(ConfigError, match=refusal):
        vision_config_from_hub(config)


def test_other_model_type_is_refused_naming_it(tmp_path: Path) -> None:
    checkpoint = write_config(tmp_path / "clip", {"model_type": "clip"})
    with pytest.raises(ConfigError, match=r"model_type 'clip' is not a SigLIP vision tower"):
        resolve_checkpoint(str(checkpoint))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([{"model_type": "siglip"}], r"config\.json is not a JSON object"),
        ({"model_type": "siglip_vision_model", "hidden_size": "768"}, r"hidden_size must be a positive integer, not '768'"),
        ({"model_type": "siglip_vision_model", "num_attention_heads": 0}, r"num_attention_heads must be a positive integer"),
        ({"model_type": "siglip_vision_model", "num_hidden_layers": -1}, r"num_hidden_layers must be a whole number ≥ 0"),
        ({"model_type": "siglip_vision_model", "vision_use_head": "false"}, r"vision_use_head must be true or false"),
        ({"model_type": "siglip_vision_model", "layer_norm_eps": None}, r"layer_norm_eps must be a number"),
        ({"model_type": "siglip_vision_model", "num_channels": 1}, r"num_channels 1 is not supported: photos are embedded as RGB"),
        ({"model_type": "siglip_vision_model", "image_size": "224"}, r"image_size must be a positive integer, not '224'"),
        ({"model_type": "siglip_vision_model", "patch_size": 16.9}, r"patch_size must be a positive integer, not 16\.9"),
        ({"model_type": "siglip_vision_model", "patch_size": [16.5, 16.5]}, r"patch_size must be a positive integer"),
        ({"model_type": "siglip2_vision_model"}, r"model_type 'siglip2_vision_model'.* not supported"),
    ],
)
def test_malformed_config_is_one_sentence_naming_the_checkpoint(tmp_path: Path, config, message: str) -> None:
    checkpoint = write_config(tmp_path / "ckpt", config)
    with pytest.raises(UserError, match=message) as error:
        resolve_checkpoint(str(checkpoint))
    assert str(checkpoint) in str(error.value) and "config.json" in str(error.value)  # which file of the folder


@pytest.mark.parametrize(
    ("preprocessor", "message"),
    [
        ({"resample": "bicubic"}, r"resample 'bicubic' is not a PIL filter number \(0 nearest, .*5 hamming\): "
                                  "transformers would resize with bilinear whatever it says"),
        ({"resample": 99}, r"resample 99 is not a PIL filter number"),
        ({"resample": 3.0}, r"resample 3.0 is not a PIL filter number"),  # passed, then failed every image
        ({"size": {"height": "224", "width": 224}}, r"preprocessor height must be a positive integer, not '224'"),
        ({"image_mean": ["a", "b", "c"]}, r"image_mean must be a list of 3 numbers, one per channel, or one number for all three, not \['a', 'b', 'c'\]"),
        ({"rescale_factor": "x"}, r"rescale_factor must be a number, not 'x'"),
        ({"do_normalize": "false"}, r"do_normalize must be true or false, not 'false'"),
        ({"do_center_crop": True, "crop_size": {"height": 24, "width": 24}}, r"crops to 24×24, a 3×3 grid of 8 px patches, but the tower takes 32×32 images"),
        ({"do_center_crop": True, "crop_size": "x"}, r"crop_size 'x' is not a \(height, width\)"),
        ({"do_center_crop": "false"}, r"do_center_crop must be true or false, not 'false'"),
        ({"size": {"shortest_edge": 48}}, r"keeps the aspect with no crop after it, and its shorter side of 48 px"),
    ],
)
def test_malformed_preprocessor_config_is_refused_when_the_checkpoint_loads(
    tiny_vision: Path, tmp_path: Path, preprocessor: dict, message: str
) -> None:
    checkpoint = copy_checkpoint(tiny_vision, tmp_path / "ckpt")
    path = checkpoint / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **preprocessor}))
    with pytest.raises(UserError, match=message) as error:
        resolve_checkpoint(str(checkpoint))
    assert "preprocessor_config.json" in str(error.value)  # not config.json: the folder holds both


def test_mistyped_local_folder_that_looks_like_a_hub_id_says_the_folder_is_missing(
    hf_cache: HubCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    said = r"^there is no folder runs/ckpt-fnal here, and as a Hub id, runs/ckpt-fnal is not"
    with pytest.raises(CheckpointError, match=said):
        resolve_checkpoint("runs/ckpt-fnal")


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        resolve_checkpoint(str(tmp_path))


def test_folder_without_weights_is_refused(tiny_vision: Path, tmp_path: Path) -> None:
    checkpoint = write_config(tmp_path / "empty", json.loads((tiny_vision / "config.json").read_text()))
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        resolve_checkpoint(str(checkpoint))


def test_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path: Path) -> None:
    missing = re.escape(str(tmp_path / "missing" / "model"))
    with pytest.raises(CheckpointError, match=f"^there is no folder {missing}: give a checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "missing" / "model"))
    for name in ("./model", "~/model", "google/", "runs/2026/ckpt"):  # no Hub id looks so
        with pytest.raises(CheckpointError, match=f"^there is no folder {re.escape(name)}: give a checkpoint"):
            resolve_checkpoint(name)
    with pytest.raises(CheckpointError, match=r"^model is neither a local checkpoint directory nor a Hub id"):
        resolve_checkpoint("model")


def test_a_file_is_refused_in_favour_of_its_folder(tiny_vision: Path) -> None:
    with pytest.raises(CheckpointError, match="is a file; pass the checkpoint directory"):
        resolve_checkpoint(str(tiny_vision / "config.json"))


def test_preset_name_is_not_a_checkpoint() -> None:
    with pytest.raises(CheckpointError, match="--model google/siglip-base-patch16-224"):
        resolve_checkpoint("siglip-base-patch16-224")


# ------------------------------------------------------------------------------ config and presets

# name: (hidden, layers, heads, patch, image size, head, resample)
PUBLIC_SHAPES = {
    "siglip-base-patch16-224": (768, 12, 12, 16, 224, True, 3),
    "siglip-base-patch16-512": (768, 12, 12, 16, 512, True, 3),
    "siglip-large-patch16-384": (1024, 24, 16, 16, 384, True, 3),
    "siglip-so400m-patch14-384": (1152, 27, 16, 14, 384, True, 3),
    "siglip-so400m-patch16-256-i18n": (1152, 27, 16, 16, 256, True, 3),
    "siglip2-base-patch16-224": (768, 12, 12, 16, 224, True, 2),
    "siglip2-base-patch32-256": (768, 12, 12, 32, 256, True, 2),
    "siglip2-so400m-patch14-384": (1152, 27, 16, 14, 384, True, 2),
    "siglip2-so400m-patch16-512": (1152, 27, 16, 16, 512, True, 2),
    "siglip2-giant-opt-patch16-384": (1536, 40, 16, 16, 384, True, 2),
    "paligemma-3b-pt-224": (1152, 27, 16, 14, 224, False, 3),
    "paligemma2-3b-pt-896": (1152, 27, 16, 14, 896, False, 3),
}


@pytest.mark.parametrize("name", list(PUBLIC_SHAPES))
def test_preset_has_the_public_shape(name: str) -> None:
    vision, preprocess = PRESETS[name]
    shape = (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size,
             vision.image_size, vision.vision_use_head, preprocess.resample)  # fmt: skip
    assert shape == PUBLIC_SHAPES[name]
    assert (preprocess.height, preprocess.width) == (vision.image_size, vision.image_size)


@pytest.mark.parametrize(
    "name, parameters", [("siglip-base-patch16-224", 92_884_224), ("siglip-so400m-patch14-384", 428_225_600)]
)
def test_preset_has_the_published_parameter_count(name: str, parameters: int) -> None:
    with torch.device("meta"):
        model = SiglipVision(PRESETS[name][0])
    assert num_parameters(model) == parameters


def test_so400m_patch14_at_384_drops_the_last_six_pixels() -> None:
    vision = PRESETS["siglip-so400m-patch14-384"][0]
    assert (vision.grid_size, vision.num_patches, vision.dropped_pixels) == (27, 729, 6)


def test_empty_vision_config_gets_transformers_defaults() -> None:
    vision = vision_config_from_hub({"model_type": "siglip", "vision_config": {}})
    assert vision == VisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
        image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True,
    )  # fmt: skip


def test_flat_vision_config_fills_only_what_it_omits() -> None:
    vision = vision_config_from_hub(
        {"model_type": "siglip_vision_model", "hidden_size": 1152, "patch_size": 14, "num_attention_heads": 16}
    )
    assert (vision.hidden_size, vision.patch_size, vision.num_attention_heads) == (1152, 14, 16)
    assert (vision.image_size, vision.intermediate_size, vision.layer_norm_eps) == (224, 3072, 1e-6)


def test_paligemma_vision_config_defaults_to_a_headless_tower() -> None:
    vision = vision_config_from_hub(
        {"model_type": "paligemma", "vision_config": {"patch_size": 14, "projector_hidden_act": "gelu_fast"}}
    )
    assert vision.vision_use_head is False and vision.image_size == 224


@pytest.mark.parametrize("config", [{}, {"vision_config": None}], ids=["absent", "null"])
def test_paligemma_without_a_vision_config_gets_the_tower_transformers_builds(config: dict) -> None:
    # It got SigLIP's default tower (768 wide, patch 16), and the weights then failed to load.
    from transformers import PaliGemmaConfig

    theirs = PaliGemmaConfig.from_dict({"model_type": "paligemma", **config}).vision_config
    ours = vision_config_from_hub({"model_type": "paligemma", **config})
    fields = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
              "image_size", "vision_use_head"]  # fmt: skip
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}


@pytest.mark.parametrize("vision_config", ["hidden_size", [768]], ids=["string", "list"])
def test_a_vision_config_that_is_no_object_is_refused(vision_config: object) -> None:
    with pytest.raises(ConfigError, match="its vision_config is (a string|an array), not a JSON object"):
        vision_config_from_hub({"model_type": "siglip", "vision_config": vision_config})


def test_square_sizes_may_be_written_as_pairs() -> None:
    vision = vision_config_from_hub(
        {"model_type": "siglip_vision_model", "image_size": [384, 384], "patch_size": [14, 14]}
    )
    assert (vision.image_size, vision.patch_size) == (384, 14)


def test_non_square_image_size_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"image_size \[384, 256\] is not square"):
        vision_config_from_hub({"model_type": "siglip_vision_model", "image_size": [384, 256]})


def test_unknown_activation_is_refused() -> None:
    with pytest.raises(ConfigError, match="hidden_act 'prelu' is not supported"):  # it has weights of its own
        vision_config_from_hub({"model_type": "siglip_vision_model", "hidden_act": "prelu"})


def test_absent_preprocessor_config_means_bicubic_at_the_tower_size() -> None:
    preprocess = preprocess_config_from_hub(None, VisionConfig(image_size=384))
    assert preprocess == PreprocessConfig(height=384, width=384, resample=3)


def test_preprocessor_config_is_read_field_by_field() -> None:
    raw = {"size": {"height": 256, "width": 256}, "resample": 2, "image_mean": [0.5, 0.4, 0.3], "image_std": 0.25}
    preprocess = preprocess_config_from_hub(raw, VisionConfig())
    assert (preprocess.height, preprocess.width, preprocess.resample) == (256, 256, 2)
    assert preprocess.image_mean == (0.5, 0.4, 0.3) and preprocess.image_std == (0.25, 0.25, 0.25)


def test_settings_of_a_step_switched_off_may_be_null() -> None:
    # transformers' own `SiglipImageProcessorPil(do_normalize=False, image_mean=None, image_std=None).save_pretrained()`
    # writes these nulls, and its processor runs them: they were refused ("expected 3 channel values").
    raw = {"do_normalize": False, "image_mean": None, "image_std": None, "do_rescale": False, "rescale_factor": None}
    preprocess = preprocess_config_from_hub(raw, VisionConfig())
    assert (preprocess.do_normalize, preprocess.do_rescale) == (False, False)
    raw = {"do_resize": False, "resample": None, "size": None}
    assert preprocess_config_from_hub(raw, VisionConfig(image_size=64)) == PreprocessConfig(64, 64, do_resize=False)


@pytest.mark.parametrize("name", ["image_mean", "rescale_factor", "resample"])
def test_a_null_setting_of_a_step_switched_on_is_refused(name: str) -> None:
    with pytest.raises(ConfigError):  # as transformers' processor fails on it
        preprocess_config_from_hub({name: None}, VisionConfig())


def test_a_size_given_as_a_pair_is_height_then_width() -> None:
    preprocess = preprocess_config_from_hub({"size": [256, 320]}, VisionConfig())
    assert (preprocess.height, preprocess.width) == (256, 320)


def test_a_crop_size_given_as_a_pair_is_height_then_width() -> None:
    # transformers reads it so (save_pretrained then writes it as a dict); we refused it.
    crop = {"size": {"shortest_edge": 320}, "do_center_crop": True}
    as_pair = preprocess_config_from_hub({**crop, "crop_size": [224, 256]}, VisionConfig(image_size=224))
    as_dict = preprocess_config_from_hub({**crop, "crop_size": {"height": 224, "width": 256}}, VisionConfig(image_size=224))
    assert as_pair == as_dict and (as_pair.height, as_pair.width) == (224, 256)


def test_a_size_transformers_refuses_or_no_image_can_fit_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"256 px, 16 rows of 16 px patches, makes no image the tower's 196 patches"):
        preprocess_config_from_hub({"size": {"shortest_edge": 256}}, VisionConfig())
    crop = {"do_center_crop": True, "crop_size": 224}
    for size in ({"height": 256, "width": 256, "shortest_edge": 256}, {"longest_edge": 256}, {"max_height": 256}):
        with pytest.raises(ConfigError, match=r"is none of the forms read here: \{height, width\}, "):
            preprocess_config_from_hub({"size": size, **crop}, VisionConfig())  # the first was read as a square


def test_a_size_of_one_number_is_a_shortest_edge_as_in_transformers() -> None:
    # For SigLIP's processor (and CLIP's, BiT's): transformers 5 keeps the aspect (test_model_parity). ViT's is square.
    cfg = preprocess_config_from_hub({"size": 224}, VisionConfig())
    assert (cfg.height, cfg.width, cfg.shortest_edge, cfg.keeps_aspect, cfg.patch_size) == (224, 224, 224, True, 16)
    vit = preprocess_config_from_hub({"image_processor_type": "ViTImageProcessor", "size": 224}, VisionConfig())
    assert (vit.height, vit.width, vit.shortest_edge, vit.keeps_aspect) == (224, 224, None, False)


def test_an_integer_tensor_is_cast_as_transformers_casts_it(tiny_vision: Path, tmp_path: Path) -> None:
    # Loaded as it was, it stopped the run in a traceback ("Only Tensors of floating point ... can require gradients").
    from transformers import SiglipVisionModel

    checkpoint = copy_checkpoint(tiny_vision, tmp_path / "ckpt")
    tensors = load_file(checkpoint / "model.safetensors")
    key = next(k for k in tensors if k.endswith("mlp.fc1.weight"))
    tensors[key] = (tensors[key] * 100).to(torch.int8)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    ours = load_model(resolve_checkpoint(str(checkpoint)))
    theirs = SiglipVisionModel.from_pretrained(checkpoint).eval()
    pixels = torch.randn(2, 3, ours.config.image_size, ours.config.image_size)
    with torch.no_grad():
        assert torch.allclose(ours(pixels).pooled, theirs(pixel_values=pixels).pooler_output, atol=1e-4)


def test_ctrl_c_while_the_weights_are_read_stops_after_the_reading(
    tiny_vision: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # safetensors' get_tensor calls back into torch: a KeyboardInterrupt raised there came out as a ValueError
    # ("could not determine the shape of object type 'torch.storage.UntypedStorage'") in a traceback.
    import contextlib
    import signal

    from siglip_cli import weights

    class Interrupted:
        def keys(self) -> list[str]:
            return ["vision_model.a", "vision_model.b"]

        def get_tensor(self, key: str) -> torch.Tensor:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a bytecode boundary: the handler runs here
            except KeyboardInterrupt:
                raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
            return torch.zeros(1)

    checkpoint = resolve_checkpoint(str(tiny_vision))
    monkeypatch.setattr(weights, "open_weights", lambda path, **_: contextlib.nullcontext(Interrupted()))
    with pytest.raises(KeyboardInterrupt):
        read_vision_tensors(checkpoint)


def test_an_openclip_checkpoint_is_named_as_such_with_the_repo_to_use_instead(tmp_path: Path) -> None:
    # "has no config.json" left a user of timm/ViT-B-16-SigLIP to guess that another layout was wanted, and which.
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {}}')
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is an OpenCLIP checkpoint .* use the transformers repo of the same "):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "siglip",')  # cut short: its own error, not OpenCLIP's
    with pytest.raises(CheckpointError, match=r"^cannot read .*config\.json: Expecting"):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "config.json").unlink()
    (tmp_path / "open_clip_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no config\.json\.$"):
        resolve_checkpoint(str(tmp_path))


def test_a_null_processor_class_reads_a_bare_size_as_siglips_processor_does() -> None:
    # `_with_class_defaults` reads a null image_processor_type as none; so must the reading of a one-number size.
    vision = VisionConfig(image_size=32, patch_size=16)
    assert preprocess_config_from_hub({"image_processor_type": None, "size": 32}, vision) == (
        preprocess_config_from_hub({"size": 32}, vision)
    )
