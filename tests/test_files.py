"""Finding the images to embed: which files a folder walk takes, in what order, and how rows name them.

`discover` never opens a file, so most files here are a few placeholder bytes; only the name and the
file type matter.
"""

from __future__ import annotations

import base64
import io
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import deadline, make_photo
from siglip_cli.errors import UserError
from siglip_cli.files import (
    WalkReport,
    discover,
    find_images,
    is_regular_file,
    missing_folders,
    path_fields,
    path_from_fields,
    read_path_list,
)
from siglip_cli.text import display_path, escape_controls, first_of


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"placeholder")
    return path


def found(*inputs: Path | str, files_from: str | None = None) -> list[str]:
    return discover([str(p) for p in inputs], files_from=files_from)


def found_with(report: WalkReport, *inputs: Path | str) -> list[str]:
    return discover([str(p) for p in inputs], report=report)


# ------------------------------------------------------------------------------------ folder walks


def test_every_image_extension_is_taken_in_any_case(tmp_path: Path) -> None:
    names = [
        "a.jpg", "b.JPEG", "c.Png", "d.webp", "e.BMP", "f.gif", "g.tif", "h.TIFF", "i.HEIC", "j.heif", "k.avif",
        "l.jfif", "m.jpe", "n.MPO", "o.apng", "p.HIF",
    ]
    for name in names:
        touch(tmp_path / name)
    assert found(tmp_path) == [str(tmp_path / name) for name in names]


def test_files_without_an_image_extension_are_left_out_and_counted(tmp_path: Path) -> None:
    for name in ("notes.txt", "IMG_0001.MOV", "IMG_0002.mov", "IMG_0001.AAE", "photo.jpg.bak", "README", "jpg"):
        touch(tmp_path / name)
    touch(tmp_path / "kept.jpg")
    report = WalkReport()
    assert discover([str(tmp_path)], report=report) == [str(tmp_path / "kept.jpg")]
    assert report.passed_over == {".mov": 2, ".txt": 1, ".aae": 1, ".bak": 1, "": 2}


def test_files_named_explicitly_are_never_counted_as_passed_over(tmp_path: Path) -> None:
    clip = touch(tmp_path / "clip.mov")
    report = WalkReport()
    assert discover([str(clip)], report=report) == [str(clip)]
    assert not report.passed_over


def test_a_file_named_in_a_folder_also_walked_is_not_counted_as_passed_over(tmp_path: Path) -> None:
    clip, notes = touch(tmp_path / "clip.mov"), touch(tmp_path / "notes.txt")
    report = WalkReport()
    assert discover([str(tmp_path), str(clip), str(clip)], report=report) == [str(clip)]
    assert report.passed_over == {".txt": 1}
    report = WalkReport()
    assert discover([str(clip), str(notes), str(tmp_path)], report=report) == [str(clip), str(notes)]
    assert not report.passed_over


def test_a_named_file_that_is_no_file_leaves_the_passed_over_count_alone(tmp_path: Path) -> None:
    for name in ("a.jpg", "x.psd", "y.psd"):
        touch(tmp_path / name)
    os.mkfifo(tmp_path / "pipe.psd")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'gone.psd'}\n{tmp_path / 'pipe.psd'}\n")  # a stale line, and a FIFO
    report = WalkReport()
    discover([str(tmp_path)], files_from=str(listing), report=report)
    assert report.passed_over == {".psd": 2, ".txt": 1}


def test_passed_over_files_are_described_most_common_first() -> None:
    assert WalkReport(Counter({".mov": 1})).passed_over_text() == "1 file (1 .mov)"
    described = WalkReport(Counter({".aae": 3, ".mov": 1204, "": 2})).passed_over_text()
    assert described == "1,209 files (1,204 .mov, 3 .aae, 2 (no extension))"
    ties = WalkReport(Counter({".txt": 1, ".mov": 1, ".aae": 1})).passed_over_text()
    assert ties == "3 files (1 .aae, 1 .mov, 1 .txt)"  # ties by name: the same text every run
    many = WalkReport(Counter({f".x{i}": 10 - i for i in range(7)})).passed_over_text()
    assert many == "49 files (10 .x0, 9 .x1, 8 .x2, 7 .x3, 6 .x4, 2 other kinds)"
    spaced = WalkReport(Counter({".jpeg ": 1})).passed_over_text()  # `IMG_2.jpeg `: no .jpeg was passed over
    assert spaced == "1 file (1 '.jpeg ')"


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A locked folder, simulated: the tests may run as root, who can list any folder whatever its mode.
    kept = touch(tmp_path / "open" / "a.jpg")
    touch(tmp_path / "gone" / "b.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if os.path.basename(path) == "gone":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = WalkReport()
    assert found_with(report, tmp_path) == [str(kept)]
    assert report.unreadable == [(str(tmp_path / "gone"), "Permission denied")]
    assert report.unreadable_text() == f"1 folder: {tmp_path / 'gone'} (Permission denied)"


def test_a_folder_that_may_be_listed_but_not_entered_is_reported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mode 600, simulated as above: its names can be read, but no file in it can be opened, so its photos are one
    # note, not an error row each.
    kept = touch(tmp_path / "open" / "a.jpg")
    for name in ("b.jpg", "c.jpg"):
        touch(tmp_path / "closed" / name)
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):
        if os.path.basename(os.path.dirname(path)) == "closed":
            raise PermissionError(13, "Permission denied", str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", lstat)
    report = WalkReport()
    assert found_with(report, tmp_path) == [str(kept)]
    # Said as such: "could not list" it, the note said.
    reason = "Permission denied: its names can be listed but its files not opened"
    assert report.unreadable == [(str(tmp_path / "closed"), reason)]
    assert report.notes()[0] == f"could not read 1 folder: {tmp_path / 'closed'} ({reason}); images there are not embedded."


def test_finding_no_image_says_what_the_walk_met_instead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path / "clip.mov")
    touch(tmp_path / "locked" / "a.jpg")
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", _refusing(real_scandir, "locked"))
    met = r"found only 1 file \(1 \.mov\); could not read 1 folder: .*locked \(Permission denied\)\)\.$"
    with pytest.raises(UserError, match=r"no image files found in .* \(looked for .*\.jpg .*; " + met):
        find_images([str(tmp_path)])


def _refusing(scandir, name: str):
    def refuse(path):
        if os.path.basename(path) == name:
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    return refuse


def test_a_folder_reached_by_a_symlink_and_directly_is_listed_under_its_real_path(tmp_path: Path) -> None:
    photo = touch(tmp_path / "Zreal" / "a.jpg")
    (tmp_path / "Alink").symlink_to("Zreal")  # sorts first, and would be walked first
    assert found(tmp_path) == [str(photo)]


@pytest.mark.parametrize("first", ["links", "photos"])
def test_a_folder_given_and_reached_through_another_inputs_link_is_listed_the_same_in_either_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    # `links photos` listed links/p/a.jpg and `photos links` photos/a.jpg: parts of a sharded run given the inputs
    # in other orders split the files by other names, and a file could fall in no part. The link also counted as
    # "out of the folders given", though it leads into one.
    touch(tmp_path / "photos" / "a.jpg")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "p").symlink_to("../photos")
    monkeypatch.chdir(tmp_path)
    report = WalkReport()
    assert discover([first, "links" if first == "photos" else "photos"], report=report) == ["photos/a.jpg"]
    assert report.outside == []


def test_files_named_twice_are_spelled_the_same_in_either_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = touch(tmp_path / "photos" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    # Two names of one file: the first by its bytes. A file named and met in a folder given: the walk's name.
    for named in (["photos/a.jpg", str(photo)], [str(photo), "photos/a.jpg"]):
        assert discover(named) == [str(photo)]
    for given in ([str(photo), "photos"], ["photos", str(photo)]):
        assert discover(given) == ["photos/a.jpg"]


def test_nas_thumbnail_snapshot_and_recycle_folders_are_skipped(tmp_path: Path) -> None:
    photo = touch(tmp_path / "2024" / "IMG_0001.JPG")
    touch(tmp_path / "2024" / "@eaDir" / "IMG_0001.JPG" / "SYNOFILE_THUMB_M.jpg")
    for folder in ("#recycle", "#snapshot", "@Recycle", "@Recently-Snapshot/GMT+01_2024-06-01_0100", "$RECYCLE.BIN",
                   "$Recycle.Bin/S-1-5-21", "lost+found"):  # fmt: skip
        touch(tmp_path / folder / "IMG_0001.JPG")
    paths, walk = find_images([str(tmp_path)])
    assert paths == [str(photo)]
    assert walk.notes() == [
        f"left out 8 folders of NAS thumbnails, snapshots, recycle bins or fsck fragments: {tmp_path / '#recycle'}, "
        f"{tmp_path / '#snapshot'}, {tmp_path / '$RECYCLE.BIN'}, 5 more."
    ]


def test_a_folder_of_skipped_folders_alone_says_which_as_the_note_does(tmp_path: Path) -> None:
    # The error said "left out 1 NAS or recycle folder", the note otherwise and with the folders named.
    touch(tmp_path / "@eaDir" / "IMG_1.JPG" / "SYNOPHOTO_THUMB_M.jpg")
    left_out = f"left out 1 folder of NAS thumbnails, snapshots, recycle bins or fsck fragments: {tmp_path / '@eaDir'}"
    with pytest.raises(UserError, match=re.escape(f"; {left_out})")):
        find_images([str(tmp_path)])


def test_a_link_to_a_skipped_folder_is_skipped_too(tmp_path: Path) -> None:
    # The note said the thumbnails folder was left out, and its thumbnails were embedded through the link.
    photo = touch(tmp_path / "DCIM" / "IMG_1.JPG")
    touch(tmp_path / "DCIM" / "@eaDir" / "IMG_1.JPG" / "SYNOPHOTO_THUMB_M.jpg")
    (tmp_path / "album").mkdir()
    (tmp_path / "album" / "thumbs").symlink_to(tmp_path / "DCIM" / "@eaDir")
    paths, walk = find_images([str(tmp_path)])
    assert paths == [str(photo)]
    assert sorted(walk.skipped) == [str(tmp_path / "DCIM" / "@eaDir"), str(tmp_path / "album" / "thumbs")]


def test_a_users_folder_named_like_a_skipped_one_in_another_case_is_walked(tmp_path: Path) -> None:
    photos = [touch(tmp_path / folder / "a.jpg") for folder in ("Lost+Found", "Recycler")]  # albums, not bins
    assert found(tmp_path) == sorted(map(str, photos))


def test_folders_are_walked_recursively(tmp_path: Path) -> None:
    deep = touch(tmp_path / "2023" / "summer" / "beach" / "wave.png")
    assert found(tmp_path) == [str(deep)]


def test_hidden_files_and_folders_are_skipped(tmp_path: Path) -> None:
    touch(tmp_path / ".thumbnail.jpg")
    touch(tmp_path / ".cache" / "photo.jpg")
    touch(tmp_path / "album" / "._photo.jpg")  # macOS resource fork
    visible = touch(tmp_path / "album" / "photo.jpg")
    touch(tmp_path / ".DS_Store")  # no image: not counted
    report = WalkReport()
    assert found_with(report, tmp_path) == [str(visible)]
    assert report.hidden_text(shown=1) == (  # it was left out without a word, a folder of photos named .trip too
        f"1 folder and 2 image files whose names start with a dot (hidden): {tmp_path / '.cache'}, 2 more"
    )
    assert report.notes()[-1] == f"left out {report.hidden_text()}; name one to embed it."
    assert report.notes(quiet=True) == []


def test_a_file_named_on_the_command_line_is_taken_whatever_its_extension(tmp_path: Path) -> None:
    named = touch(tmp_path / "scan.dat")
    assert found(named) == [str(named)]


def test_paths_come_back_sorted_by_their_bytes(tmp_path: Path) -> None:
    for name in ("b.jpg", "a/z.jpg", "B.jpg", "a.jpg", "a/b/c.jpg"):
        touch(tmp_path / name)
    paths = found(tmp_path / "b.jpg", tmp_path)  # argument order does not matter
    assert paths == sorted(paths, key=os.fsencode)
    assert [os.path.relpath(p, tmp_path) for p in paths] == ["B.jpg", "a.jpg", "a/b/c.jpg", "a/z.jpg", "b.jpg"]


def test_a_file_reached_several_ways_is_listed_once(tmp_path: Path) -> None:
    photo = touch(tmp_path / "album" / "photo.jpg")
    paths = found(tmp_path, photo, f"{tmp_path}/album/./photo.jpg", tmp_path / "album")
    assert paths == [str(photo)]


def test_a_file_named_relatively_and_absolutely_is_one_row_under_the_folders_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = touch(tmp_path / "album" / "photo.jpg")
    (tmp_path / "linked").symlink_to(tmp_path / "album")
    monkeypatch.chdir(tmp_path)
    assert found("album", photo, "linked/photo.jpg", "album/../album/photo.jpg") == ["album/photo.jpg"]
    assert found(photo, "album") == ["album/photo.jpg"]


def test_links_to_a_photo_under_other_names_are_rows_of_their_own(tmp_path: Path) -> None:
    photo = touch(tmp_path / "photo.jpg")
    (tmp_path / "symlink.jpg").symlink_to(photo)
    os.link(photo, tmp_path / "hardlink.jpg")
    assert [Path(p).name for p in found(tmp_path)] == ["hardlink.jpg", "photo.jpg", "symlink.jpg"]


def test_dot_dot_after_a_symlinked_folder_names_what_the_file_system_opens(tmp_path: Path) -> None:
    # link → real/deep, so link/.. is real/, not tmp_path: tidied as text, the path named the other target.png.
    wanted = touch(tmp_path / "real" / "target.png")
    touch(tmp_path / "target.png")
    (tmp_path / "real" / "deep").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")
    for named in (f"{tmp_path}/link/../target.png", f"{tmp_path}/link/.."):
        paths = discover([named])
        assert len(paths) == 1 and os.path.samefile(paths[0], wanted), (named, paths)


def test_symlink_loop_neither_hangs_nor_repeats_images(tmp_path: Path) -> None:
    photo = touch(tmp_path / "album" / "photo.jpg")
    (tmp_path / "album" / "again").symlink_to(".")  # album/again/again/again/... forever
    (tmp_path / "album" / "up").symlink_to("..")
    with deadline(10):
        paths = found(tmp_path)
    assert paths == [str(photo)]


def test_a_symlink_that_points_at_itself_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "self.jpg").symlink_to("self.jpg")
    photo = touch(tmp_path / "photo.jpg")
    assert found(tmp_path) == [str(photo)]


def test_fifo_named_like_an_image_is_not_listed_from_a_folder(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "stream.jpg")  # opening it for reading would block forever
    photo = touch(tmp_path / "photo.jpg")
    with deadline(10):
        assert found(tmp_path) == [str(photo)]


def test_entries_named_like_images_that_are_no_files_are_reported(tmp_path: Path) -> None:
    # A library of links into an unmounted drive lost its rows without a word.
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "unmounted" / "gone.jpg")
    (tmp_path / "self.jpg").symlink_to("self.jpg")
    os.mkfifo(tmp_path / "stream.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # it was "a broken link": the user went looking for a drive
    (tmp_path / "to-stream.jpg").symlink_to("stream.jpg")
    (tmp_path / "gone.mov").symlink_to(tmp_path / "unmounted" / "gone.mov")  # no image: a link that leads nowhere
    photo = touch(tmp_path / "photo.jpg")
    report = WalkReport()
    assert found_with(report, tmp_path) == [str(photo)]
    assert sorted((Path(p).name, kind) for p, kind in report.not_files) == [
        ("gone.jpg", "a broken link"), ("self.jpg", "a symlink loop"), ("stream.jpg", "a FIFO"),
        ("to-stream.jpg", "a link to a FIFO"), ("zero.jpg", "a link to a device"),
    ]  # fmt: skip
    assert report.not_files_text(shown=1) == (
        f"5 entries named like images are not files: {tmp_path / 'gone.jpg'} (a broken link), 4 more"
    )
    assert [Path(link).name for link, _ in report.dangling] == ["gone.mov"]


def test_a_folder_link_into_an_unmounted_drive_is_named_with_where_it_leads(tmp_path: Path) -> None:
    (tmp_path / "nas").symlink_to("/mnt/not-mounted/Photos")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to-pipe").symlink_to(tmp_path / "pipe")  # leads somewhere: to a FIFO, which is not a photo
    photo = touch(tmp_path / "photo.jpg")
    report = WalkReport()
    assert found_with(report, tmp_path) == [str(photo)]
    assert report.dangling_text() == (
        f"1 link that leads nowhere (an unmounted drive?): {tmp_path / 'nas'} → /mnt/not-mounted/Photos"
    )
    (tmp_path / "photo.jpg").unlink()
    with pytest.raises(UserError, match=r"1 link that leads nowhere \(an unmounted drive\?\): .*nas → /mnt"):
        find_images([str(tmp_path)])


def test_folder_links_that_loop_or_cannot_be_followed_are_named_too(tmp_path: Path) -> None:
    # Both were passed over without a word: a folder of photos behind such a link went unseen, and --strict passed.
    (tmp_path / "b-loop").symlink_to("a-loop")
    (tmp_path / "a-loop").symlink_to("b-loop")
    photo = touch(tmp_path / "photo.jpg")
    (tmp_path / "via-a-file").symlink_to(photo / "sub")  # fails as a link through a folder closed to this user does
    report = WalkReport()
    assert found_with(report, tmp_path) == [str(photo)]
    assert report.dangling_text() == (  # no drive to mount: it said "(an unmounted drive?)"
        f"2 links that lead nowhere: {tmp_path / 'a-loop'} → b-loop (a loop), "
        f"{tmp_path / 'b-loop'} → a-loop (a loop)"
    )
    (tmp_path / "nas").symlink_to("/mnt/not-mounted/Photos")
    report = WalkReport()
    found_with(report, tmp_path)
    assert report.dangling_text(shown=1) == (
        f"3 links that lead nowhere (an unmounted drive?): {tmp_path / 'a-loop'} → b-loop (a loop), 2 more"
    )
    assert report.unreadable == [(str(tmp_path / "via-a-file"), "Not a directory")]


def test_a_folder_of_nothing_but_dead_links_says_so(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").symlink_to(tmp_path / "unmounted" / "a.jpg")
    with pytest.raises(UserError, match=r"1 entry named like an image is not a file: .*a\.jpg \(a broken link\)\)\.$"):
        find_images([str(tmp_path)])


def test_folder_links_out_of_the_folder_given_are_reported(tmp_path: Path) -> None:
    photo = touch(tmp_path / "photos" / "a.jpg")
    elsewhere = touch(tmp_path / "elsewhere" / "b.jpg")
    (tmp_path / "photos" / "inside").symlink_to(tmp_path / "photos")  # a loop inside: entered no more
    (tmp_path / "photos" / "out").symlink_to(tmp_path / "elsewhere")
    report = WalkReport()
    assert found_with(report, tmp_path / "photos") == [str(photo), str(tmp_path / "photos" / "out" / "b.jpg")]
    assert report.outside == [(str(tmp_path / "photos" / "out"), str(elsewhere.parent))]
    assert report.outside_text() == f"1 folder link out of the folders given: {tmp_path}/photos/out → {tmp_path}/elsewhere"
    report = WalkReport()
    found_with(report, tmp_path)  # walked from above, the same link stays inside
    assert report.outside == []


def test_only_regular_files_count_as_files(tmp_path: Path) -> None:
    photo = touch(tmp_path / "photo.jpg")
    os.mkfifo(tmp_path / "stream.jpg")
    (tmp_path / "link.jpg").symlink_to("photo.jpg")
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    with deadline(10):
        assert is_regular_file(str(photo)) and is_regular_file(str(tmp_path / "link.jpg"))
        assert not is_regular_file(str(tmp_path / "stream.jpg"))
        assert not is_regular_file(str(tmp_path / "loop.jpg"))
        assert not is_regular_file(str(tmp_path))
        assert not is_regular_file(str(tmp_path / "missing.jpg"))


def test_missing_input_is_a_user_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "holiday" / "missing.jpg"
    with pytest.raises(UserError, match="missing.jpg does not exist"):
        found(missing)


@pytest.mark.parametrize("name", ["photo.jpg", "nas"])
def test_input_that_is_a_link_leading_nowhere_is_a_user_error_naming_its_target(tmp_path: Path, name: str) -> None:
    # As a missing input is: it was an errors row for a file, and a run that embedded nothing else.
    (tmp_path / name).symlink_to(tmp_path / "unmounted" / name)
    with pytest.raises(UserError, match=f"^input {tmp_path / name} is a link to {tmp_path / 'unmounted' / name}, "
                                        "which does not exist.$"):  # fmt: skip
        found(tmp_path / name)


def test_input_in_a_folder_that_cannot_be_entered_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photo = touch(tmp_path / "locked" / "a.jpg")
    stat = os.stat

    def denied(path, *args, **kwargs):  # `chmod 0 locked` (these tests run as root, who may enter anyway)
        if str(path) == str(photo):
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", denied)
    with pytest.raises(UserError, match=r"locked/a.jpg cannot be read: Permission denied\.$"):
        found(photo)


def test_a_macos_photos_library_gives_each_photo_once(tmp_path: Path) -> None:
    library = tmp_path / "Photos Library.photoslibrary"
    original = touch(library / "originals" / "A" / "IMG_1.heic")
    older = touch(library / "Masters" / "2015" / "IMG_0.jpg")
    touch(library / "resources" / "derivatives" / "A" / "IMG_1_1_105_c.jpeg")
    touch(library / "resources" / "derivatives" / "masters" / "A" / "IMG_1_4_5005_c.jpeg")
    touch(library / "scopes" / "cloudsharing" / "x.jpg")
    touch(library / ".Photos_Search" / "x.jpg")  # passed by as the rest of the library is, not named as hidden
    report = WalkReport()
    assert found_with(report, tmp_path) == sorted([str(original), str(older)], key=os.fsencode)
    assert report.hidden == []


def test_the_rest_of_a_photos_library_is_said_to_be_left_out(tmp_path: Path) -> None:
    # Its other folders were left out without a word, and a library without its originals ("Optimize Mac
    # Storage") was "no image files found" alone.
    library = tmp_path / "Photos Library.photoslibrary"
    touch(library / "resources" / "derivatives" / "A" / "IMG_1_1_105_c.jpeg")
    touch(library / "originals" / "A" / "IMG_1.mov")  # originals, with no photo in them: not "it lacks originals"
    with pytest.raises(UserError, match="found only 1 file \\(1 .mov\\)\\)\\.$"):
        find_images([str(library)])
    (library / "originals" / "A" / "IMG_1.mov").unlink()
    (library / "originals" / "A").rmdir()
    (library / "originals").rmdir()
    with pytest.raises(UserError, match=f"; {re.escape(str(library))} has no originals folder, the only one of a "
                                        "Photos library walked\\)\\.$"):  # fmt: skip
        find_images([str(library)])
    other = tmp_path / "Other.photoslibrary"  # beside one without: that one was listed as walked
    touch(other / "originals" / "A" / "IMG_1.heic")
    report = WalkReport()
    assert [Path(p).name for p in found_with(report, tmp_path)] == ["IMG_1.heic"]
    assert report.notes() == [
        f"walked only the originals folder (`originals`, `Masters`) of {other}; the rest of a Photos library is not "
        "embedded.",
        f"no originals folder (`originals`, `Masters`) in {library}: nothing there is embedded (the rest of a "
        "Photos library holds copies).",
    ]


@pytest.mark.parametrize("name", ["iPhoto Library.photolibrary", "Aperture Library.aplibrary"])
def test_older_apple_libraries_give_their_masters_only(tmp_path: Path, name: str) -> None:
    master = touch(tmp_path / name / "Masters" / "2009" / "IMG_0.jpg")
    touch(tmp_path / name / "Previews" / "2009" / "IMG_0.jpg")
    touch(tmp_path / name / "Thumbnails" / "2009" / "IMG_0.jpg")
    assert found(tmp_path) == [str(master)]


def test_a_photos_library_reached_through_a_symlink_is_still_one(tmp_path: Path) -> None:
    library = tmp_path / "Photos Library.photoslibrary"
    touch(library / "originals" / "A" / "IMG_1.heic")
    touch(library / "resources" / "derivatives" / "A" / "IMG_1_1_105_c.jpeg")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "photos").symlink_to(library)
    (tmp_path / "elsewhere" / "more").symlink_to(library)  # and one met inside a walk
    for named in (tmp_path / "elsewhere" / "photos", tmp_path / "elsewhere"):
        assert [Path(p).name for p in found(named)] == ["IMG_1.heic"], named


# ----------------------------------------------------------------------------------- path lists


def test_files_from_reads_one_path_per_line(tmp_path: Path) -> None:
    first, second = touch(tmp_path / "b.jpg"), touch(tmp_path / "a.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{first}\n\n{second}\r\n")  # blank lines and CRLF endings are fine
    assert found(files_from=str(listing)) == [str(second), str(first)]


def test_files_from_reads_nul_separated_paths(tmp_path: Path) -> None:
    odd = touch(tmp_path / "line\nbreak.jpg")  # what `find -print0` is for
    plain = touch(tmp_path / "plain.jpg")
    listing = tmp_path / "list.bin"
    listing.write_bytes(os.fsencode(odd) + b"\0" + os.fsencode(plain) + b"\0")
    assert found(files_from=str(listing)) == [str(odd), str(plain)]


def test_files_from_reads_nul_separated_one_character_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `0\01\02\0` (class folders 0-9 of a dataset, from `find -print0`) was read as UTF-16: "could not embed 012".
    monkeypatch.chdir(tmp_path)
    photos = [touch(tmp_path / name / "a.jpg") for name in "012"]
    listing = tmp_path / "list.bin"
    listing.write_bytes(b"0\x001\x002\x00")
    assert sorted(found(files_from=str(listing))) == sorted(os.path.relpath(p, tmp_path) for p in photos)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig", "utf-16-le"])
def test_files_from_written_by_windows_tools_is_read_by_its_byte_order_mark(tmp_path: Path, encoding: str) -> None:
    # PowerShell 5's `>` writes UTF-16 with a BOM (split at its NUL bytes, the list would name `/` and `.`), some
    # tools without one; Notepad wrote UTF-8 with one.
    first, second = touch(tmp_path / "b.jpg"), touch(tmp_path / "ä.jpg")
    listing = tmp_path / "list.txt"
    text = f"{first}\r\n{second}\r\n"
    listing.write_bytes(("\ufeff" + text).encode("utf-16-be") if encoding == "utf-16-be" else text.encode(encoding))
    assert found(files_from=str(listing)) == [str(first), str(second)]


def test_files_from_dash_reads_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photo = touch(tmp_path / "photo.jpg")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{photo}\n".encode())))
    assert found(files_from="-") == [str(photo)]


def test_files_from_keeps_missing_lines_to_fail_as_bad_files(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'deleted.jpg'}\n")
    assert found(files_from=str(listing)) == [str(tmp_path / "deleted.jpg")]


def test_files_from_walks_listed_folders(tmp_path: Path) -> None:
    photo = touch(tmp_path / "album" / "photo.jpg")
    touch(tmp_path / "album" / ".hidden.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'album'}\n")
    assert found(files_from=str(listing)) == [str(photo)]


def test_files_from_adds_to_the_arguments(tmp_path: Path) -> None:
    argument, listed = touch(tmp_path / "b.jpg"), touch(tmp_path / "a.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{listed}\n{argument}\n")
    assert found(argument, files_from=str(listing)) == [str(listed), str(argument)]


def test_unreadable_path_list_is_a_user_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read the path list .*nope.txt"):
        read_path_list(str(tmp_path / "nope.txt"))


def test_an_empty_path_list_name_is_refused() -> None:
    with pytest.raises(UserError, match="the path list's name is empty"):  # was read as the current folder
        read_path_list("")


@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
def test_a_photo_given_as_the_path_list_is_refused(kind: str, tmp_path: Path) -> None:
    # `--files-from photo.jpg` read the JPEG's bytes as 667 paths, each an error row.
    photo = tmp_path / f"photo.{kind.lower()}"
    make_photo((80, 60)).save(photo, format=kind)
    with pytest.raises(UserError, match=f"the path list {photo} is not text"):
        read_path_list(str(photo))


def test_a_path_list_with_a_name_holding_a_control_character_is_read(tmp_path: Path) -> None:
    listing = tmp_path / "list"
    listing.write_bytes(b"a.jpg\0b\x1b[31m.jpg\0c.jpg\0")  # find -print0 passes any name, escape codes included
    assert read_path_list(str(listing)) == ["a.jpg", "b\x1b[31m.jpg", "c.jpg"]


# --------------------------------------------------------------------------------- naming rows


def test_names_reach_the_terminal_without_their_control_characters() -> None:
    assert display_path("a\x1b[31mred\nb.jpg") == "a\\x1b[31mred\\x0ab.jpg"  # no colours, one line


def test_names_whose_bytes_are_not_utf8_reach_the_terminal_apart() -> None:
    # Both were `caf\ufffd.jpg`: a note that one of them was gone did not say which.
    names = [display_path(os.fsdecode(b"card/caf" + byte + b".jpg")) for byte in (b"\xe8", b"\xe9")]
    assert names == ["card/caf\\xe8.jpg", "card/caf\\xe9.jpg"]
    assert display_path(b"caf\xc3\xa9.jpg") == "caf\u00e9.jpg"  # UTF-8 as it is
    assert escape_controls("odd\ud800.jpg") == "odd\ufffd.jpg"  # a lone surrogate that holds no byte of a name


def test_utf8_name_is_written_as_a_plain_path() -> None:
    assert path_fields("photos/été 2023/plage.jpg") == {"path": "photos/été 2023/plage.jpg"}


def test_non_utf8_name_carries_its_exact_bytes_in_base64() -> None:
    raw = b"photos/caf\xe9.jpg"  # Latin-1 name from an old camera card
    fields = path_fields(os.fsdecode(raw))
    assert fields["path"] == "photos/caf\ufffd.jpg"  # readable, though lossy
    assert base64.b64decode(fields["path_bytes_b64"]) == raw
    assert os.fsencode(path_from_fields(fields)) == raw


def test_non_utf8_names_are_found_and_sorted_by_bytes(tmp_path: Path) -> None:
    latin1 = touch(tmp_path / os.fsdecode(b"caf\xe9.jpg"))
    utf8 = touch(tmp_path / "caf\u00e9.jpg")  # b"caf\xc3\xa9.jpg" sorts first
    assert found(tmp_path) == [str(utf8), str(latin1)]


def test_folders_that_cannot_be_made_are_not_said_to_be(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a read-only file system (or where root's permissions do not reach): "note: the output's folder ... will be
    # made", then the error that it could not be.
    target = tmp_path / "new" / "sub" / "e.npy"
    assert missing_folders(target) == [str(tmp_path / "new"), str(tmp_path / "new" / "sub")]
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    assert missing_folders(target) == []


def test_a_list_cut_short_names_the_one_item_it_would_count() -> None:
    # "5 .mov, 4 .aae, 3 .json, 2 .xml, 2 .txt, 1 other kind": the sixth kind takes no more room than its count.
    assert first_of(["a", "b", "c", "d"], 3) == "a, b, c, d"
    assert first_of(["a", "b", "c", "d", "e"], 3) == "a, b, c, 2 more"
    six = WalkReport(passed_over=Counter({".mov": 5, ".aae": 4, ".json": 3, ".xml": 2, ".txt": 2, ".xmp": 1}))
    assert six.passed_over_text() == "17 files (5 .mov, 4 .aae, 3 .json, 2 .txt, 2 .xml, 1 .xmp)"
    seven = WalkReport(passed_over=Counter({**six.passed_over, ".pdf": 1}))
    assert seven.passed_over_text() == "18 files (5 .mov, 4 .aae, 3 .json, 2 .txt, 2 .xml, 2 other kinds)"


def test_a_listed_link_to_nothing_names_its_target_in_its_error_row(tmp_path: Path) -> None:
    # From --files-from, a photo linked into a drive not mounted failed with "No such file or directory" alone,
    # where the walk and the command line name the link's target.
    from siglip_cli.reading import failure_reason

    (tmp_path / "gone.jpg").symlink_to(tmp_path / "unmounted" / "gone.jpg")
    missing = FileNotFoundError(2, os.strerror(2))
    assert failure_reason(missing, str(tmp_path / "gone.jpg")) == (
        f"{os.strerror(2)} (a link to {tmp_path / 'unmounted' / 'gone.jpg'}, which does not exist)"
    )
    assert failure_reason(missing, str(tmp_path / "never.jpg")) == os.strerror(2)
