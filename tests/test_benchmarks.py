"""The offline benchmark builders on synthetic inputs: a fake unpacked icon-theme tree and the
fonts of this machine. Nothing is downloaded unless LOOKALIKE_NETWORK_TESTS=1."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.benchmarks import cjk, common, icons
from training.data.benchmarks.debian import (
    FetchResult,
    UnpackedPackage,
    fetch_packages,
    parse_deb_filename,
    resolve_link,
)
from training.data.records import DatasetError

SIZE = 32  # the smallest output size: keeps the renders cheap

# --------------------------------------------------------------------------- fake icon themes

FAMILIES = [f"theme{i:02d}" for i in range(10)] + ["Mint-Y", "Moka"]
KEPT = ["edit-copy", "edit-find", "go-down", "go-up", "media-play", "media-stop", "weather-snow"]
RARE = "weather-fog"  # drawn by only 9 families


def pattern(seed: int, side: int = 48) -> np.ndarray:
    """A random 6x6 block pattern; two seeds give thumbnails far apart (mean diff ~80)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((side // 6, side // 6, 1), dtype=np.uint8))


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_svg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rects = "".join(
        f'<rect x="{x * 8}" y="{y * 8}" width="8" height="8" '
        f'fill="rgb({rng.integers(0, 256)},{rng.integers(0, 256)},{rng.integers(0, 256)})"/>'
        for x in range(6)
        for y in range(6)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 48 48">{rects}</svg>')


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def make_icon_packages(root: Path) -> tuple[dict[str, UnpackedPackage], list[icons.IconFamily]]:
    """12 theme families; what each cleaning rule must catch is planted in known places."""
    packages, families = {}, []
    for number, family in enumerate(FAMILIES):
        package_root = root / f"pkg-{family}"
        theme = package_root / "usr/share/icons" / family
        for index, name in enumerate([*KEPT, RARE]):
            if name == RARE and number >= 9:
                continue
            seed = number * 100 + index
            if number % 3 == 0:  # every third family draws scalable SVGs
                write_svg(theme / "scalable/actions" / f"{name}.svg", seed)
            else:
                write_png(theme / "48x48/actions" / f"{name}.png", pattern(seed))
                # A smaller, different drawing of the same name: the 48 px one must win.
                write_png(theme / "16x16/actions" / f"{name}.png", pattern(seed + 50_000, 12))
        # Symbolic icons are skipped, whether by suffix or by folder.
        write_png(theme / "48x48/actions/edit-cut-symbolic.png", pattern(number + 7000))
        write_png(theme / "symbolic/actions/edit-paste.png", pattern(number + 8000))
        # gtk-find is a symlink to edit-find in most families: one class, named edit-find.
        if number < 8:
            suffix = "svg" if number % 3 == 0 else "png"
            folder = "scalable" if number % 3 == 0 else "48x48"
            link(theme / folder / "actions" / f"gtk-find.{suffix}", f"edit-find.{suffix}")
        packages[f"pkg-{family}"] = UnpackedPackage(f"pkg-{family}", "1.0-1", package_root)
        families.append(icons.IconFamily(family, (icons.IconTheme(f"pkg-{family}", family),)))

    png = "48x48/actions/{}.png"
    icon_dir = {f: root / f"pkg-{f}/usr/share/icons" / f for f in FAMILIES}
    # theme01 reuses its go-up drawing for go-down (absolute link, as in a real package).
    (icon_dir["theme01"] / png.format("go-down")).unlink()
    link(
        icon_dir["theme01"] / png.format("go-down"),
        "/usr/share/icons/theme01/" + png.format("go-up"),
    )
    # theme02 ships theme01's media-play file byte for byte.
    shutil.copy(
        icon_dir["theme01"] / png.format("media-play"),
        icon_dir["theme02"] / png.format("media-play"),
    )
    # theme04's media-stop is theme01's plus faint noise: a near-duplicate render.
    noisy = np.asarray(Image.open(icon_dir["theme01"] / png.format("media-stop"))).astype(int)
    noisy = np.clip(noisy + np.random.default_rng(0).integers(-2, 3, noisy.shape), 0, 255)
    write_png(icon_dir["theme04"] / png.format("media-stop"), noisy.astype(np.uint8))
    # theme05's weather-snow is white on transparent: near-blank on white.
    blank = np.zeros((48, 48, 4), dtype=np.uint8)
    blank[..., :3] = 255
    blank[8:40, 8:40, 3] = 255
    write_png(icon_dir["theme05"] / png.format("weather-snow"), blank)
    # Moka's go-up differs from Mint-Y's by ~8 grey levels: a near-duplicate between forks
    # only; the same difference between theme07 and theme08 is kept.
    for source, copy in (("Mint-Y", "Moka"), ("theme07", "theme08")):
        shifted = np.asarray(Image.open(icon_dir[source] / png.format("go-up"))).astype(int)
        write_png(
            icon_dir[copy] / png.format("go-up"), np.clip(shifted + 8, 0, 255).astype(np.uint8)
        )
    return packages, families


@pytest.fixture
def icon_packages(tmp_path: Path) -> tuple[dict[str, UnpackedPackage], list[icons.IconFamily]]:
    return make_icon_packages(tmp_path / "cache")


def assemble(target: Path, packages, families) -> dict:
    return icons.assemble_icons(
        target, packages, families=families, size=SIZE, workers=1, progress=False
    )


def test_icon_cleaning_rules_keep_and_drop_the_planted_samples(tmp_path: Path, icon_packages):
    report = assemble(tmp_path / "out", *icon_packages)

    classes = report["classes"]["train"] + report["classes"]["test"]
    assert sorted(classes) == KEPT  # gtk-find merged, weather-fog (9 families) dropped
    assert report["aliases"] == {"edit-find": ["edit-find", "gtk-find"]}
    assert report["dropped"] == {
        icons.REUSED: 2,  # theme01's go-up/go-down drawing, from both classes
        icons.IDENTICAL: 1,  # theme02's copied media-play
        icons.NEAR_DUPLICATE: 2,  # theme04's media-stop, Moka's go-up
        icons.NEAR_BLANK: 1,  # theme05's weather-snow
        icons.TOO_FEW: 9,  # weather-fog
        "symbolic icon": 24,
    }
    counts = {
        name: len(list((tmp_path / "out" / split / name).glob("*.png")))
        for split in common.SPLITS
        for name in report["classes"][split]
    }
    assert counts["media-play"] == 11 and counts["go-up"] == 10 and counts["edit-find"] == 12
    assert not (tmp_path / "out/train/go-up/Moka.png").exists()
    assert (tmp_path / "out/train/go-up/theme08.png").exists() or (
        tmp_path / "out/test/go-up/theme08.png"
    ).exists()


def test_icon_renders_are_rgb_on_white_at_the_requested_size(tmp_path: Path, icon_packages):
    assemble(tmp_path / "out", *icon_packages)
    images = sorted((tmp_path / "out").glob("*/*/*.png"))
    assert images and not (tmp_path / "out" / icons.RENDERS_FOLDER).exists()
    for path in images[:: max(1, len(images) // 10)]:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    svg_render = next(p for p in images if p.stem == "theme00")
    assert np.asarray(Image.open(svg_render)).std() > 20  # the SVG's coloured blocks


def test_icon_split_is_disjoint_by_class_and_prefix_and_deterministic(tmp_path, icon_packages):
    first = assemble(tmp_path / "a", *icon_packages)["classes"]
    second = assemble(tmp_path / "b", *icon_packages)["classes"]
    assert first == second
    train, test = first["train"], first["test"]
    assert train and test and not set(train) & set(test)
    assert not {icons.name_prefix(n) for n in train} & {icons.name_prefix(n) for n in test}


def test_split_by_prefix_places_whole_groups_until_half_the_classes():
    names = [
        f"{group}-{i}" for group in ("media", "weather", "edit", "go", "mail") for i in range(4)
    ]
    train, test = icons.split_by_prefix(names)
    assert sorted(train + test) == sorted(names)
    assert len(train) >= len(names) / 2 and len(train) - 4 < len(names) / 2
    assert icons.split_by_prefix(list(reversed(names))) == (train, test)
    assert icons.name_prefix("stock_new-window") == "stock"


def test_scan_theme_prefers_scalable_then_largest_and_skips_symbolic(tmp_path: Path):
    theme = tmp_path / "usr/share/icons/t"
    write_png(theme / "16x16/apps/calc.png", pattern(1, 12))
    write_png(theme / "apps/32@2x/calc.png", pattern(2))  # 64 px: beats 48x48
    write_png(theme / "48x48/apps/calc.png", pattern(3))
    write_png(theme / "256x256/apps/term.png", pattern(4))
    write_svg(theme / "scalable/apps/term.svg", 5)
    write_png(theme / "48x48/apps/term-symbolic.png", pattern(6))
    dropped: Counter[str] = Counter()
    found = icons.scan_theme(theme, tmp_path, dropped)
    assert set(found) == {"calc", "term"}
    assert found["calc"][0] == (theme / "apps/32@2x/calc.png").resolve()
    assert found["term"][0].suffix == ".svg"
    assert dropped["symbolic icon"] == 1


def test_resolve_link_re_roots_absolute_targets(tmp_path: Path):
    root = tmp_path / "pkg"
    write_png(root / "usr/share/icons/t/a.png", pattern(1))
    link(root / "usr/share/icons/t/b.png", "/usr/share/icons/t/a.png")
    link(root / "usr/share/icons/t/c.png", "b.png")
    link(root / "usr/share/icons/t/dangling.png", "missing.png")
    expected = (root / "usr/share/icons/t/a.png").resolve()
    assert resolve_link(root / "usr/share/icons/t/c.png", root) == expected
    assert resolve_link(root / "usr/share/icons/t/dangling.png", root) is None


# --------------------------------------------------------------------------- atomic output


@pytest.fixture
def fake_icon_fetch(monkeypatch, icon_packages):
    """build_icons on the fake themes: fetch_packages is replaced and counts its calls."""
    packages, families = icon_packages
    calls = []

    def fetch(names, cache_dir, **_):
        calls.append(list(names))
        return FetchResult(packages=packages, missing=["librsvg2-bin"])

    monkeypatch.setattr(common, "fetch_packages", fetch)
    monkeypatch.setattr(icons, "ICON_FAMILIES", tuple(families))
    return calls


def build(out: Path, **kwargs) -> dict:
    return icons.build_icons(
        out, cache_dir=out.parent / "cache", progress=False, workers=1, **kwargs
    )


def test_build_writes_manifest_and_a_second_run_is_cached(tmp_path, fake_icon_fetch, monkeypatch):
    out = tmp_path / "icons"
    manifest = build(out, size=SIZE)
    on_disk = json.loads((out / common.MANIFEST_NAME).read_text())
    assert on_disk == manifest
    assert manifest["benchmark"] == "IconThemes" and manifest["parameters"]["size"] == SIZE
    assert manifest["splits"] == common.split_counts(out)
    assert manifest["missing_packages"] == ["librsvg2-bin"]
    assert {s["family"] for s in manifest["sources"]} == set(FAMILIES)
    assert "pillow" in manifest["library_versions"]

    def must_not_render(*_args, **_kwargs):
        raise AssertionError("a cached build rendered again")

    monkeypatch.setattr(icons, "render_table", must_not_render)
    assert build(out, size=SIZE) == manifest
    assert len(fake_icon_fetch) == 1


def test_changed_parameters_or_pruned_output_rebuild(tmp_path, fake_icon_fetch):
    out = tmp_path / "icons"
    build(out, size=SIZE)
    bigger = build(out, size=48)
    assert bigger["parameters"]["size"] == 48 and len(fake_icon_fetch) == 2
    with Image.open(next(out.glob("train/*/*.png"))) as image:
        assert image.size == (48, 48)
    next(out.glob("test/*/*.png")).unlink()
    build(out, size=48)
    assert len(fake_icon_fetch) == 3


def test_a_failing_build_leaves_nothing_complete_and_the_next_run_rebuilds(
    tmp_path, fake_icon_fetch, monkeypatch
):
    out = tmp_path / "icons"

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(icons, "split_by_prefix", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build(out, size=SIZE)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".icons")] == []

    # A killed run leaves a hidden build folder; an incomplete output has no manifest.
    stale = tmp_path / ".icons.partial-999999999"
    stale.mkdir()
    (stale / common.MARKER_NAME).touch()
    out.mkdir()
    (out / common.MARKER_NAME).touch()
    (out / "train").mkdir()
    build(out, size=SIZE)
    assert (out / common.MANIFEST_NAME).exists() and not stale.exists()


def test_a_failing_rebuild_keeps_the_previous_complete_output(
    tmp_path, fake_icon_fetch, monkeypatch
):
    out = tmp_path / "icons"
    before = build(out, size=SIZE)
    monkeypatch.setattr(icons, "split_by_prefix", lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build(out, size=48)
    assert common.read_manifest(out) == before


def test_refuses_to_replace_a_folder_that_is_not_a_benchmark(tmp_path, fake_icon_fetch):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(DatasetError, match="not a lookalike benchmark output"):
        build(out, size=SIZE)
    assert (out / "holiday.jpg").read_bytes() == b"not ours"
    assert fake_icon_fetch == []  # refused before any download


# --------------------------------------------------------------------------- CJK-Fonts


def find_fonts(count: int) -> list[Path]:
    """Distinct TrueType fonts installed on this machine (DejaVu on Debian)."""
    roots = [Path("/usr/share/fonts"), Path("/usr/local/share/fonts")]
    found = sorted({p.name: p for r in roots if r.is_dir() for p in r.rglob("*.ttf")}.values())
    preferred = [p for p in found if p.stem in ("DejaVuSans", "DejaVuSerif")]
    fonts = (preferred + [p for p in found if p not in preferred])[:count]
    if len(fonts) < count:
        pytest.skip(f"needs {count} TrueType fonts under /usr/share/fonts")
    return fonts


def located(path: Path, name: str | None = None) -> cjk.LocatedFont:
    return cjk.LocatedFont(cjk.FontSource("pkg", name or path.name), path, "1.0")


def test_core_han_characters_match_docs_benchmarks():
    characters = cjk.core_han_characters()
    assert len(characters) == 1583  # docs/benchmarks.md
    assert all(0x4E00 <= ord(c) <= 0x9FFF for c in characters)
    assert {"一", "人", "日", "山"} <= set(characters)


def test_cjk_split_and_max_classes_depend_only_on_the_characters():
    characters = cjk.core_han_characters()
    train, test = cjk.split_characters(characters)
    assert (len(train), len(test)) == (791, 792)  # docs/benchmarks.md
    assert not set(train) & set(test)
    assert cjk.split_characters(list(reversed(characters))) == (train, test)
    selected = cjk.select_characters(characters, 5)
    assert selected["train"] == sorted(train, key=cjk.class_folder)[:5]
    assert selected["test"] == sorted(test, key=cjk.class_folder)[:5]
    assert cjk.class_folder("一") == "U+4E00"


def test_render_font_job_crops_ink_and_detects_notdef_and_blank(tmp_path: Path):
    font = located(find_fonts(1)[0])
    job = cjk.FontJob(font, ["A", "一", " "], tmp_path, SIZE)
    outcomes = cjk.render_font_job(job)
    assert isinstance(outcomes[0], np.ndarray)
    assert outcomes[1:] == [cjk.NOTDEF, cjk.BLANK]  # DejaVu has no Han glyphs
    with Image.open(tmp_path / "U+0041" / f"{font.name}.png") as image:
        assert image.mode == "RGB" and image.size == (SIZE, SIZE)
        ink = np.asarray(image.convert("L")) < 128
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    assert rows[0] <= 1 and rows[-1] >= SIZE - 2  # cropped to the ink: 'A' spans the height
    assert cols[-1] - cols[0] < SIZE - 2  # aspect kept, centred
    assert abs((cols[0] + cols[-1]) / 2 - (SIZE - 1) / 2) <= 1.5
    assert not (tmp_path / "U+4E00").exists()


def test_render_glyph_returns_the_cropped_ink():
    font = cjk.load_font(located(find_fonts(1)[0]), SIZE)
    glyph = cjk.render_glyph(font, "I")
    assert glyph is not None and glyph.getbbox() == (0, 0, *glyph.size)
    assert cjk.render_glyph(font, " ") is None
    notdef = cjk.render_glyph(font, cjk.NOTDEF_PROBE)
    assert notdef is not None and cjk.same_bitmap(cjk.render_glyph(font, "一"), notdef)
    assert not cjk.same_bitmap(glyph, notdef)


@pytest.fixture
def fake_fonts(tmp_path: Path, monkeypatch):
    """Two distinct fonts plus a renamed copy of the first (its renders are duplicates)."""
    sources = find_fonts(2)
    packages, table = {}, []
    for number, source in enumerate([*sources, sources[0]]):
        name = f"copy{source.suffix}" if number == len(sources) else source.name
        root = tmp_path / "cache" / f"pkg{number}"
        (root / "usr/share/fonts/truetype").mkdir(parents=True)
        shutil.copy(source, root / "usr/share/fonts/truetype" / name)
        packages[f"pkg{number}"] = UnpackedPackage(f"pkg{number}", "1.0", root)
        table.append(cjk.FontSource(f"pkg{number}", name))
    monkeypatch.setattr(cjk, "CJK_FONTS", tuple(table))
    monkeypatch.setattr(
        common, "fetch_packages", lambda *_a, **_k: FetchResult(packages=packages, missing=[])
    )
    monkeypatch.setattr(cjk, "core_han_characters", lambda: [*"ABCDEFGH", "一"])
    return table


def test_build_cjk_on_latin_fonts(tmp_path: Path, fake_fonts):
    out = tmp_path / "cjk"
    manifest = cjk.build_cjk(
        out, cache_dir=tmp_path / "cache", size=SIZE, progress=False, workers=2
    )
    characters = {**manifest["characters"]["train"], **manifest["characters"]["test"]}
    assert sorted(characters.values()) == list("ABCDEFGH")  # 一 is in none of the fonts
    assert characters["U+0041"] == "A"
    assert manifest["samples_per_font"]["copy"] == 0  # all near-duplicates of the original
    assert manifest["dropped"][cjk.NOTDEF] == 3
    assert manifest["dropped"][cjk.NEAR_DUPLICATE] == 8
    train = [c for c in cjk.split_characters([*"ABCDEFGH", "一"])[0] if c != "一"]
    assert manifest["splits"]["train"] == {"classes": len(train), "images": 2 * len(train)}
    assert sorted(
        p.name for p in (out / "train" / next(iter(manifest["characters"]["train"]))).iterdir()
    ) == sorted(f"{Path(s.file).stem}.png" for s in fake_fonts[:2])
    assert cjk.build_cjk(out, cache_dir=tmp_path / "cache", size=SIZE, progress=False) == manifest


def test_build_cjk_max_classes_keeps_the_first_classes_by_folder_name(tmp_path, fake_fonts):
    manifest = cjk.build_cjk(
        tmp_path / "cjk",
        cache_dir=tmp_path / "cache",
        max_classes=2,
        size=SIZE,
        progress=False,
        workers=1,
    )
    train, test = cjk.split_characters([*"ABCDEFGH", "一"])
    assert list(manifest["characters"]["train"]) == sorted(map(cjk.class_folder, train))[:2]
    assert list(manifest["characters"]["test"]) == sorted(map(cjk.class_folder, test))[:2]
    assert manifest["parameters"]["max_classes"] == 2


# --------------------------------------------------------------------------- Debian cache


def test_parse_deb_filename_unquotes_the_epoch():
    name, version = parse_deb_filename(Path("fonts-noto-cjk_1%3a20220127+repack1-1_all.deb"))
    assert (name, version) == ("fonts-noto-cjk", "1:20220127+repack1-1")
    with pytest.raises(DatasetError):
        parse_deb_filename(Path("broken.deb"))


@pytest.mark.network
@pytest.mark.skipif(
    os.environ.get("LOOKALIKE_NETWORK_TESTS") != "1", reason="set LOOKALIKE_NETWORK_TESTS=1"
)
def test_fetch_a_small_real_package_then_reuse_the_cache(tmp_path: Path):
    names = ["gnome-icon-theme-suede", "lookalike-no-such-package"]
    result = fetch_packages(names, tmp_path, progress=False)
    assert result.missing == ["lookalike-no-such-package"]
    package = result.packages["gnome-icon-theme-suede"]
    assert (package.root / "usr/share/icons/Suede").is_dir()
    deb = next((tmp_path / "debs").glob("*.deb"))
    mtime = deb.stat().st_mtime_ns
    again = fetch_packages(names[:1], tmp_path, progress=False)
    assert again.packages == result.packages and deb.stat().st_mtime_ns == mtime
