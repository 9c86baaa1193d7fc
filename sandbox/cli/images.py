"""``sandbox image ...``: build, list, inspect and remove guest images."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..base.sizes import format_size
from .common import emit, format_option, friendly, main, remote_cell, remote_sizes


@main.group()
def image() -> None:
    """Build, list, inspect and remove guest images."""


@image.command("build")
@click.argument("recipe")
@click.option("--force", is_flag=True, help="Rebuild even when the cache has this image.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image path.")
@friendly
def image_build(recipe: str, force: bool, quiet: bool) -> None:
    """Build RECIPE (a name from images/ or a path to a .toml file), cached by content."""
    from ..base.progress import Reporter
    from ..imaging.image import build_image, cached_image
    from ..imaging.recipe import find_recipe

    parsed = find_recipe(recipe)
    reporter = Reporter(quiet=quiet)
    hit = None if force else cached_image(parsed)
    if hit is not None:
        if not quiet:
            click.echo(f"{hit.name}: cached ({hit.digest[:16]})", err=True)
        click.echo(str(hit.path))
        return
    from ..vm.golden import remove_stale

    built = build_image(parsed, reporter=reporter, force=force)
    for line in remove_stale(built) if force else []:
        reporter.note(line)
    if not quiet:
        if built.built_now:
            click.echo(f"{built.name}: built in {built.manifest['build_seconds']} s "
                       f"({built.digest[:16]})", err=True)
        else:
            click.echo(f"{built.name}: cached, built meanwhile by a concurrent build "
                       f"({built.digest[:16]})", err=True)
    click.echo(str(built.path))


@image.command("list")
@format_option
@friendly
def image_list(fmt: str) -> None:
    """The known recipes (built-in, ./images, SANDBOX_IMAGES_PATH) and the images built."""
    from ..errors import SandboxError
    from ..imaging.image import current_path, list_images
    from ..imaging.recipe import known_recipes, parse_recipe

    recipes = known_recipes()
    images = list_images()
    current = {}
    for name, path in recipes.items():
        try:
            current[name] = current_path(parse_recipe(path))
        except SandboxError:  # a broken recipe: listed, its images' state unknown
            current[name] = None
    rows = [{"name": i.name, "digest": i.digest, "path": str(i.path), "size": i.size,
             "built_at": i.manifest["built_at"],
             "current": None if current.get(i.name) is None else i.path == current[i.name],
             "recipe": str(recipes.get(i.name) or i.manifest.get("recipe_path")),
             "source": i.manifest.get("source"), "source_sha256": i.manifest.get("source_sha256"),
             "boot": i.boot}
            for i in images]
    rows += [{"name": name, "digest": None, "path": None, "size": None, "built_at": None,
              "current": None, "recipe": str(path), "source": None, "source_sha256": None,
              "boot": None}
             for name, path in recipes.items() if not any(i.name == name for i in images)]
    rows.sort(key=lambda row: (row["name"], row["built_at"] or ""))
    remote = remote_sizes([f"image-{r['digest']}" for r in rows if r["digest"]])
    for row in rows:
        row["remote_size"] = (remote or {}).get(f"image-{row['digest']}")
    emit(rows, fmt, [
        ("NAME", 20, lambda r: r["name"]),
        ("DIGEST", 16, lambda r: r["digest"][:16] if r["digest"] else "-"),
        ("SIZE", -7, lambda r: format_size(r["size"]) if r["size"] is not None else "-"),
        *([("REGISTRY", -10, lambda r: remote_cell(remote, f"image-{r['digest']}"
                                                   if r["digest"] else None))]
          if remote is not None else []),
        ("BUILT", 24, lambda r: r["built_at"] or "not built"),
        ("CURRENT", 7, lambda r: {True: "yes", False: "old"}.get(r["current"], "-")),
        ("BOOT", 6, lambda r: r["boot"] or "-"),
        ("SOURCE", 0, lambda r: f"{r['source']} (sha256 {r['source_sha256'][:16]})"
         if r["source"] else r["recipe"]),
    ], empty="no recipes and no images: add images/NAME.toml (see images/README.md)")


@image.command("inspect")
@click.argument("name")
@friendly
def image_inspect(name: str) -> None:
    """The manifest of a built image, as JSON."""
    from ..imaging.image import find_images

    found = find_images(name)
    click.echo(json.dumps([dict(i.manifest, path=str(i.path)) for i in found]
                          if len(found) > 1 else dict(found[0].manifest, path=str(found[0].path)),
                          indent=2))


@image.command("rm")
@click.argument("name")
@click.option("--old", is_flag=True, help="Keep the version NAME's recipe builds now; remove "
              "the others (earlier recipes, earlier sandbox versions) and their snapshots.")
@friendly
def image_rm(name: str, old: bool) -> None:
    """Remove every built version of image NAME, and its golden snapshots, from the cache."""
    from ..imaging.image import current_path
    from ..imaging.recipe import find_recipe
    from ..vm.golden import remove_images

    keep = None
    if old:
        keep = current_path(find_recipe(name))
        if keep is None:
            raise click.ClickException(f"which version of {name} is current cannot be told "
                                       "(its disk is missing): remove them all with "
                                       f"sandbox image rm {name}")
    lines = remove_images(name, keep)
    for line in lines:
        click.echo(line)
    if old and not lines:
        click.echo(f"{name}: no old versions")


@image.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@click.option("--name", help="The image's name (default: the file's name without suffix).")
@click.option("--boot", type=click.Choice(["bios", "uefi"]), default="bios", show_default=True,
              help="The firmware that boots it.")
@click.option("--user", default="", help="The account that gets the cache's key (default: "
              "cloud-init's default user).")
@click.option("--memory", default="1G", show_default=True)
@click.option("--cpus", default=2, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing recipe of that name.")
@friendly
def image_import(file: str, name: str | None, boot: str, user: str, memory: str, cpus: int,
                 force: bool) -> None:
    """Write images/NAME.toml for disk image FILE (qcow2, raw, VMDK, VDI, VHDX) and import it
    into the cache; prints the image's path."""
    from ..base.progress import Reporter
    from ..imaging.foreign import write_disk_recipe
    from ..imaging.image import build_image

    recipe = write_disk_recipe(Path(file), name=name, boot=boot, user=user, memory=memory,
                               cpus=cpus, force=force)
    click.echo(f"wrote {recipe.path}", err=True)
    built = build_image(recipe, reporter=Reporter())
    click.echo(f"{built.name}: imported from {built.manifest['source_format']} in "
               f"{built.manifest['build_seconds']} s ({built.digest[:16]})", err=True)
    click.echo(str(built.path))
