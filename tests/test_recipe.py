"""Recipes: parsing, validation, and error messages that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.errors import RecipeError
from sandbox.imaging.recipe import find_recipe, known_recipes, parse_recipe


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtin_debian_12_recipe_is_valid() -> None:
    recipe = find_recipe("debian-12")
    assert recipe.suite == "bookworm"
    assert "linux-image-cloud-amd64" in recipe.packages
    assert "python3" in recipe.packages
    assert recipe.memory_bytes == 1 << 30
    assert recipe.disk_bytes == 2 << 30


def test_defaults_and_name_from_file(tmp_path: Path) -> None:
    recipe = parse_recipe(write(tmp_path, 'packages = ["curl"]\n', "my-image.toml"))
    assert recipe.name == "my-image"
    assert recipe.cpus == 2 and recipe.memory == "1G" and recipe.disk_size == "2G"
    assert recipe.components == ("main",)


def test_misspelled_field_is_named_with_suggestion(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"unknown field 'pakages'.*did you mean 'packages'"):
        parse_recipe(write(tmp_path, 'pakages = ["curl"]\n'))


def test_misspelled_file_field_is_named(tmp_path: Path) -> None:
    text = '[[files]]\npath = "/etc/x"\ncontnt = "x"\n'
    with pytest.raises(RecipeError, match=r"files\[0\]: unknown field 'contnt'"):
        parse_recipe(write(tmp_path, text))


@pytest.mark.parametrize(("text", "message"), [
    ('cpus = "two"\n', "field 'cpus' must be int"),
    ("cpus = 0\n", "between 1 and 64"),
    ('memory = "lots"\n', "field 'memory': not a size"),
    ('disk_size = "2X"\n', "field 'disk_size'"),
    ('packages = "curl"\n', "field 'packages' must be list"),
    ('packages = ["Not A Package"]\n', "not a Debian package name"),
    ('[[files]]\npath = "relative"\ncontent = "x"\n', "absolute guest path"),
    ('[[files]]\npath = "/a"\n', "exactly one of 'content' or 'source'"),
    ('[[files]]\npath = "/a"\nsource = "missing.txt"\n', "no file 'missing.txt'"),
    ('[[files]]\npath = "/a"\ncontent = "x"\nmode = "9z"\n', "octal"),
    ('[[files]]\npath = "/../../etc/x"\ncontent = "x"\n', "without '..' parts"),
    ('[[files]]\npath = "/etc/../../x"\ncontent = "x"\n', "without '..' parts"),
    ('[[files]]\npath = "/a"\nsource = "/etc/shadow"\n', "outside the recipe's directory"),
    ('[[files]]\npath = "/a"\nsource = "../../../../etc/passwd"\n',
     "outside the recipe's directory"),
    ("suite = \n", "not valid TOML"),
    ("cpu = 3\n", "field 'cpu' must be str"),
    ('cpu = "Haswell,+avx2"\n', "field 'cpu': CPU model 'Haswell,\\+avx2' is not a model name"),
    ('cpu = ""\n', "field 'cpu': CPU model '' is not a model name"),
])
def test_bad_values_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(write(tmp_path, text))


def test_unknown_image_lists_known_ones() -> None:
    with pytest.raises(RecipeError) as info:
        find_recipe("debian-13x")
    text = str(info.value)
    assert "unknown image 'debian-13x'" in text
    assert "debian-12" in text


def test_digest_follows_content(tmp_path: Path) -> None:
    data = tmp_path / "motd"
    data.write_text("one")
    path = write(tmp_path, '[[files]]\npath = "/etc/motd"\nsource = "motd"\n')
    first = parse_recipe(path).digest()
    assert parse_recipe(path).digest() == first
    data.write_text("two")
    assert parse_recipe(path).digest() != first


def test_recipe_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, 'packages = ["curl"]\n', "custom.toml")
    monkeypatch.setenv("SANDBOX_IMAGES_PATH", str(tmp_path))
    assert "custom" in known_recipes()
    assert find_recipe("custom").packages == ("curl",)


def test_disk_fields_stay_out_of_a_debian_recipes_key(tmp_path: Path) -> None:
    """Recipes built from packages hash as before disk recipes existed (no needless rebuilds);
    a disk recipe's key has no Debian-only fields."""
    debian = tmp_path / "plain.toml"
    debian.write_text('packages = ["linux-image-cloud-amd64"]\n')
    data = parse_recipe(debian).canonical()
    assert not {"disk", "sha256", "boot", "user", "cloud_init_user_data"} & set(data)
    disk = tmp_path / "appliance.toml"
    disk.write_text('disk = "a.vmdk"\nboot = "uefi"\n')
    recipe = parse_recipe(disk)
    assert recipe.kind == "disk" and recipe.disk_path == tmp_path / "a.vmdk"
    assert not {"suite", "packages", "disk_size"} & set(recipe.canonical())


def test_cpu_model_is_read_and_keys_recipes_that_set_it(tmp_path: Path) -> None:
    plain = parse_recipe(write(tmp_path, 'packages = ["curl"]\nmemory = "2G"\n', "my-image.toml"))
    assert plain.cpu == ""
    assert "cpu" not in plain.canonical()
    # The digest this recipe had before recipes had a cpu field: its image stays cached.
    assert plain.digest() == "0fb5823507ad8df17575b718b7a3d56ee40835c36338e7c037fac4614ee69480"
    pinned = parse_recipe(write(tmp_path, 'packages = ["curl"]\nmemory = "2G"\n'
                                          'cpu = "x86-64-v3"\n', "my-image.toml"))
    assert pinned.cpu == "x86-64-v3" and pinned.canonical()["cpu"] == "x86-64-v3"
    assert pinned.digest() != plain.digest()
