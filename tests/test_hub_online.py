"""`--model org/name` online, through huggingface_hub's own HTTP code against a Hub on localhost (`hub_server`).

Each run is a `siglip embed` process, as a user starts it, with `HF_ENDPOINT` pointing at the fake Hub and an empty
`HF_HOME`: first the download, then the same id offline from the cache it filled; a pinned revision; only the
vision shards of a sharded checkpoint; and the ways a Hub fails (unknown repo or revision, gated, an outage, a
connection dropped mid-file), each one sentence and exit 2, never a traceback or a wrong reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from conftest import make_photo, save_as_pickles
from hub_server import FakeHub

REPO = "google/siglip-tiny-online"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    hub = FakeHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, size in enumerate([(80, 60), (45, 70), (33, 33)]):
        make_photo(size, seed=i).save(folder / f"{i}.jpg")
    return folder


Run = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def siglip(hub: FakeHub, tmp_path: Path) -> Run:
    """`siglip(*args, **env)` runs `siglip *args` in a process of its own whose Hub is `hub`, cache empty at first."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and "proxy" not in k.lower()}
    base |= {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}

    def run(*args: object, **env: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "siglip_cli", *map(str, args)]
        return subprocess.run(command, env=base | env, capture_output=True, text=True, timeout=180)

    return run


def embedded(done: subprocess.CompletedProcess, output: Path) -> tuple[np.ndarray, dict[str, str]]:
    assert done.returncode == 0, done.stderr
    with safe_open(output, framework="np") as f:
        return f.get_tensor("embeddings"), f.metadata()


def the_error(done: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a run that failed cleanly: exit 2, no traceback."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_a_hub_id_is_downloaded_once_then_embeds_offline_from_the_cache(
    hub: FakeHub, siglip: Run, tiny_siglip: Path, photos: Path, tmp_path: Path
) -> None:
    commit = hub.publish(REPO, tiny_siglip)
    local, _ = embedded(siglip("embed", photos, "-m", tiny_siglip, "-o", tmp_path / "local.safetensors", "-q"),
                        tmp_path / "local.safetensors")  # fmt: skip
    out = tmp_path / "hub.safetensors"

    online, meta = embedded(siglip("embed", photos, "-m", REPO, "-o", out, "-q"), out)
    assert np.array_equal(online, local)
    assert (meta["model"], meta["revision"]) == (REPO, commit)
    # The two configs and the weights, each once; processor_config.json asked for (this repo has none), no more.
    assert sorted(hub.downloaded(REPO)) == ["config.json", "model.safetensors", "preprocessor_config.json"]

    hub.stop()  # the machine goes offline: the cache serves the id, with or without HF_HUB_OFFLINE
    for env in ({}, {"HF_HUB_OFFLINE": "1"}):
        offline, meta = embedded(siglip("embed", photos, "-m", REPO, "-o", out, "-q", "--overwrite", **env), out)
        assert np.array_equal(offline, local)
        assert meta["revision"] == commit


def test_only_the_shards_holding_the_vision_tower_are_downloaded(
    hub: FakeHub, siglip: Run, tiny_sharded: Path, photos: Path, tmp_path: Path
) -> None:
    hub.publish(REPO, tiny_sharded)
    weight_map = json.loads((tiny_sharded / "model.safetensors.index.json").read_text())["weight_map"]
    vision_shards = {shard for key, shard in weight_map.items() if key.startswith("vision_model.")}
    assert vision_shards != set(weight_map.values())  # the text tower's shards exist, to be left alone

    embedded(siglip("embed", photos, "-m", REPO, "-o", tmp_path / "out.safetensors", "-q"), tmp_path / "out.safetensors")
    shards = {name for name in hub.downloaded(REPO) if name.startswith("model-")}
    assert shards == vision_shards


def test_a_repo_with_only_pickles_is_downloaded_once_then_embeds_offline(
    hub: FakeHub, siglip: Run, tiny_siglip: Path, photos: Path, tmp_path: Path
) -> None:
    # huggingface_hub marks the safetensors files the Hub said the commit lacks: offline, the cached pickle is known
    # to be what transformers would load.
    pickled = save_as_pickles(tiny_siglip, tmp_path / "pickled")
    hub.publish(REPO, pickled)
    local, _ = embedded(siglip("embed", photos, "-m", pickled, "-o", tmp_path / "local.safetensors", "-q"),
                        tmp_path / "local.safetensors")  # fmt: skip
    out = tmp_path / "hub.safetensors"
    online, _ = embedded(siglip("embed", photos, "-m", REPO, "-o", out, "-q"), out)
    assert np.array_equal(online, local)
    assert sorted(hub.downloaded(REPO)) == ["config.json", "preprocessor_config.json", "pytorch_model.bin"]

    hub.stop()
    for env in ({}, {"HF_HUB_OFFLINE": "1"}):
        offline, _ = embedded(siglip("embed", photos, "-m", REPO, "-o", out, "-q", "--overwrite", **env), out)
        assert np.array_equal(offline, local)


def test_a_revision_embeds_the_weights_it_names(
    hub: FakeHub, siglip: Run, tiny_siglip: Path, tiny_siglip2: Path, photos: Path, tmp_path: Path
) -> None:
    v1 = hub.publish(REPO, tiny_siglip, ref="v1")
    main = hub.publish(REPO, tiny_siglip2, ref="main")
    for model, revision, commit in [(tiny_siglip, "v1", v1), (tiny_siglip2, main, main)]:
        reference, _ = embedded(siglip("embed", photos, "-m", model, "-o", tmp_path / "ref.safetensors", "-q",
                                       "--overwrite"), tmp_path / "ref.safetensors")  # fmt: skip
        out = tmp_path / f"{revision}.safetensors"
        got, meta = embedded(siglip("embed", photos, "-m", REPO, "--revision", revision, "-o", out, "-q"), out)
        assert np.array_equal(got, reference)
        assert meta["revision"] == commit


def test_inspect_and_bench_take_the_revision_they_are_given(
    hub: FakeHub, siglip: Run, tiny_siglip: Path, tiny_odd_heads: Path
) -> None:
    # Two towers of other widths (32 and 36) under one id: each command measures the revision it is given.
    hub.publish(REPO, tiny_siglip, ref="v1")
    hub.publish(REPO, tiny_odd_heads, ref="main")

    def reported(*args: object) -> dict:
        done = siglip(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    for ref, width in (("v1", 32), ("main", 36)):
        assert reported("inspect", "-m", REPO, "--revision", ref)["config"]["hidden_size"] == width
    bench = ("bench", "--device", "cpu", "-b", "1", "--iters", "1", "--warmup", "0")
    weights = {ref: reported(*bench, "-m", REPO, "--revision", ref)["weights_mb"] for ref in ("v1", "main")}
    assert weights["v1"] == reported(*bench, "-m", tiny_siglip)["weights_mb"] != weights["main"]
    assert f"{REPO} has no revision 'v9'" in the_error(siglip(*bench, "-m", REPO, "--revision", "v9"))
    assert "no --revision" in the_error(siglip(*bench, "--revision", "v1"))


@pytest.mark.parametrize(
    "repo_id, revision, expected",
    [
        ("google/siglip-missing", None, "google/siglip-missing was not found on the Hugging Face Hub"),
        ("google/siglip-gated", None, "google/siglip-gated is gated: accept its licence"),
        (REPO, "v9", f"{REPO} has no revision 'v9'"),
        ("google/siglip-no-weights", None, "google/siglip-no-weights has no model.safetensors, model.safetensors.index.json, "
                                           "pytorch_model.bin or pytorch_model.bin.index.json"),
    ],
)  # fmt: skip
def test_what_the_hub_refuses_is_one_sentence_naming_it(
    hub: FakeHub, siglip: Run, tiny_siglip: Path, photos: Path, tmp_path: Path,
    repo_id: str, revision: str | None, expected: str,
) -> None:  # fmt: skip
    hub.publish(REPO, tiny_siglip)
    hub.publish("google/siglip-gated", tiny_siglip, gated=True)
    configs_only = tmp_path / "configs_only"
    configs_only.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (configs_only / name).write_bytes((tiny_siglip / name).read_bytes())
    hub.publish("google/siglip-no-weights", configs_only)

    args = ["embed", photos, "-m", repo_id, "-o", tmp_path / "out.safetensors"]
    assert expected in the_error(siglip(*args, *(["--revision", revision] if revision else [])))


@pytest.mark.parametrize(
    "status, expected",
    [
        (520, "the Hub answered HTTP 520: try again later"),  # a server error huggingface_hub does not retry
        (403, "the Hub answered HTTP 403: check HF_TOKEN and any proxy or firewall"),
    ],
)
def test_a_hub_failing_on_the_weights_says_so_not_that_the_repo_has_none(
    hub: FakeHub, siglip: Run, tiny_siglip: Path, photos: Path, tmp_path: Path, status: int, expected: str
) -> None:
    hub.publish(REPO, tiny_siglip)
    hub.fail["model.safetensors"] = status
    error = the_error(siglip("embed", photos, "-m", REPO, "-o", tmp_path / "out.safetensors"))
    assert f"model.safetensors of {REPO} is not in the local Hugging Face cache and {expected}" in error


def test_a_download_cut_off_midway_is_one_sentence_and_the_rerun_completes_it(
    hub: FakeHub, siglip: Run, tiny_siglip: Path, photos: Path, tmp_path: Path
) -> None:
    hub.publish(REPO, tiny_siglip)
    out = tmp_path / "out.safetensors"
    hub.fail["model.safetensors"] = "truncated"
    error = the_error(siglip("embed", photos, "-m", REPO, "-o", out))
    assert f"downloading model.safetensors of {REPO} stopped" in error
    assert "run the command again to retry" in error

    del hub.fail["model.safetensors"]
    reference, _ = embedded(siglip("embed", photos, "-m", tiny_siglip, "-o", tmp_path / "ref.safetensors", "-q"),
                            tmp_path / "ref.safetensors")  # fmt: skip
    got, _ = embedded(siglip("embed", photos, "-m", REPO, "-o", out, "-q"), out)
    assert np.array_equal(got, reference)


def cache_all_but(filename: str, hub: FakeHub, siglip: Run, checkpoint: Path, photos: Path) -> None:
    """Publish `checkpoint` as REPO, let a first run cache what it fetched before `filename` failed, then go offline."""
    hub.publish(REPO, checkpoint)
    hub.fail[filename] = 520
    the_error(siglip("embed", photos, "-m", REPO, "-o", photos.parent / "first.safetensors"))
    hub.stop()


def test_an_offline_machine_with_half_a_first_download_names_the_missing_file(
    hub: FakeHub, siglip: Run, tiny_siglip: Path, photos: Path, tmp_path: Path
) -> None:
    # The configs arrived, the weights did not (the first run was stopped during the big download); then offline.
    cache_all_but("model.safetensors", hub, siglip, tiny_siglip, photos)
    for env, why in [({}, "the Hub cannot be reached"), ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set")]:
        error = the_error(siglip("embed", photos, "-m", REPO, "-o", tmp_path / "out.safetensors", **env))
        assert f"model.safetensors of {REPO} is not in the local Hugging Face cache and {why}" in error


def test_an_offline_cache_without_the_preprocessor_config_is_not_guessed(
    hub: FakeHub, siglip: Run, tiny_siglip2: Path, photos: Path, tmp_path: Path
) -> None:
    # A cache filled by `SiglipVisionModel.from_pretrained` alone holds config.json and the weights: SigLIP's
    # default preprocessing (bicubic) would silently differ from this SigLIP2 repo's (bilinear).
    cache_all_but("preprocessor_config.json", hub, siglip, tiny_siglip2, photos)
    error = the_error(siglip("embed", photos, "-m", REPO, "-o", tmp_path / "out.safetensors"))
    assert f"preprocessor_config.json of {REPO} is not in the local Hugging Face cache" in error
