"""A batch: the jobs for a folder of images, with the prompts (and seeds) a file in it gives each image.

`python -m app batch FOLDER` uses plan_batch() to turn the folder into items; app.jobqueue checks and queues
them. Rules:
- Every image of the folder (png, jpg, jpeg, webp, bmp; hidden files skipped) in name order.
- Prompts come from a CSV (columns image, prompt, and optionally seed and negative_prompt; one job per row, so
  an image may have several rows) or a text file: one prompt a line for the images in name order, or
  `name.png: prompt` lines. Without --prompts, the folder's prompts.csv or prompts.txt is used (both at once
  is refused: which one was meant is unclear). Blank lines and lines starting with # are skipped.
- An image with no prompt there takes the default prompt (--prompt); with neither, the batch is refused.
- Each item becomes one job per seed of `seeds`; a CSV row's own seed makes it one job with that seed.
Anything unclear refuses the whole batch, naming the file and the line, before anything is queued.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_NAMED_LINE = re.compile(r"^(?P<name>[^:]+?\.(?:png|jpe?g|webp|bmp))\s*:\s*(?P<prompt>.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class BatchItem:
    """One job of a batch."""

    image: Path
    prompt: str
    seed: Any = None  # None: the configured default seed
    negative_prompt: str | None = None  # None: the configured default

    @property
    def label(self) -> str:
        return self.image.name


def parse_seeds(text: str | None) -> list[int | None]:
    """`--seeds 1,2,3` as a list; [None] (the configured default) when not given."""
    if text is None or not text.strip():
        return [None]
    seeds = []
    for part in text.split(","):
        part = part.strip()
        try:
            seeds.append(int(part))
        except ValueError:
            raise InputError(f"--seeds must be whole numbers separated by commas (e.g. 1,2,3), got {part!r}.",
                             f"--seeds 必须是以逗号分隔的整数(例如 1,2,3),收到的是 {part!r}。") from None
    return seeds


def folder_images(folder: Path) -> list[Path]:
    """The images of `folder`, in name order."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of images.", f"{folder} 不是图片文件夹。")
    images = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                     and p.is_file()), key=lambda p: p.name)
    if not images:
        raise InputError(f"No images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) in {folder}.",
                         f"{folder} 中没有图片({', '.join(s[1:] for s in IMAGE_SUFFIXES)})。")
    return images


def _prompts_file(folder: Path, given: Path | None) -> Path | None:
    if given is not None:
        if not given.is_file():
            raise InputError(f"The prompts file {given} does not exist.", f"提示词文件 {given} 不存在。")
        return given
    found = [folder / name for name in ("prompts.csv", "prompts.txt") if (folder / name).is_file()]
    if len(found) > 1:
        raise InputError(f"{folder} has both prompts.csv and prompts.txt: keep one, or name it with --prompts.",
                         f"{folder} 中同时有 prompts.csv 和 prompts.txt:请只保留一个,或用 --prompts 指定。")
    return found[0] if found else None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # utf-8-sig: a BOM from Windows' Notepad or Excel is no text
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"The prompts file {path.name} could not be read as UTF-8 text ({exc}).",
                         f"无法以 UTF-8 文本读取提示词文件 {path.name}({exc})。") from None


def _from_csv(path: Path, names: dict[str, Path]) -> dict[str, list[dict[str, str]]]:
    """image name -> its rows (prompt, seed, negative_prompt), in file order."""
    rows = list(csv.reader(_read_text(path).splitlines()))
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    missing = [column for column in ("image", "prompt") if column not in header]
    if missing:
        raise InputError(f"{path.name} needs a first row naming its columns: image,prompt[,seed][,negative_prompt] "
                         f"(missing: {', '.join(missing)}).",
                         f"{path.name} 的第一行须为列名:image,prompt[,seed][,negative_prompt](缺少:{', '.join(missing)})。")
    found: dict[str, list[dict[str, str]]] = {}
    for number, cells in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue
        row = {column: (cells[i].strip() if i < len(cells) else "") for i, column in enumerate(header)}
        name = row["image"]
        if name not in names:
            raise InputError(f"{path.name} row {number}: {name!r} is not an image in the folder.",
                             f"{path.name} 第 {number} 行:{name!r} 不是该文件夹中的图片。")
        found.setdefault(name, []).append(row)
    return found


def _from_text(path: Path, images: list[Path]) -> dict[str, list[dict[str, str]]]:
    names = {p.name for p in images}
    lines = [(number, line.strip()) for number, line in enumerate(_read_text(path).splitlines(), start=1)
             if line.strip() and not line.strip().startswith("#")]
    named = [(number, _NAMED_LINE.match(line)) for number, line in lines]
    found: dict[str, list[dict[str, str]]] = {}
    if any(match and match["name"].strip() in names for _, match in named):
        for number, match in named:
            if match is None:
                raise InputError(f"{path.name} line {number} is a plain prompt, but other lines are `name.png: prompt` "
                                 "lines: use one form for the whole file.",
                                 f"{path.name} 第 {number} 行是普通提示词,而其他行是 `name.png: prompt` 格式:"
                                 "整个文件请使用同一种格式。")
            if match["name"].strip() not in names:
                raise InputError(f"{path.name} line {number}: {match['name'].strip()!r} is not an image in the folder.",
                                 f"{path.name} 第 {number} 行:{match['name'].strip()!r} 不是该文件夹中的图片。")
            found.setdefault(match["name"].strip(), []).append({"prompt": match["prompt"].strip()})
        return found
    if len(lines) > len(images):
        raise InputError(f"{path.name} has {len(lines)} prompts for {len(images)} images: give one line per image, "
                         "in name order, or `name.png: prompt` lines.",
                         f"{path.name} 有 {len(lines)} 条提示词,但只有 {len(images)} 张图片:请按文件名顺序每张图片一行,"
                         "或使用 `name.png: prompt` 格式。")
    return {image.name: [{"prompt": line}] for image, (_, line) in zip(images, lines)}


def plan_batch(folder: Path, *, prompt: str | None = None, prompts_file: Path | None = None,
               seeds: list[int | None] | None = None) -> list[BatchItem]:
    """The batch's jobs in order: the images by name, each image's prompts in file order, each prompt per seed."""
    images = folder_images(folder)
    source = _prompts_file(folder, prompts_file)
    given: dict[str, list[dict[str, str]]] = {}
    if source is not None:
        given = _from_csv(source, {p.name: p for p in images}) if source.suffix.lower() == ".csv" \
            else _from_text(source, images)
    default = prompt if prompt is not None and prompt.strip() else None
    items = []
    for image in images:
        for row in given.get(image.name) or [{}]:
            text = row.get("prompt") or default
            if text is None:
                where = f" in {source.name}" if source is not None else ""
                raise InputError(f"{image.name} has no prompt{where}: add one, or give --prompt for every image "
                                 "without one.",
                                 f"{image.name} 没有提示词{('(' + source.name + ')') if source else ''}:请补上,"
                                 "或用 --prompt 为没有提示词的图片指定默认提示词。")
            negative = row.get("negative_prompt") or None
            row_seed = row.get("seed") or ""
            if row_seed:
                try:
                    item_seeds: list[Any] = [int(row_seed)]
                except ValueError:
                    raise InputError(f"{source.name}: the seed of {image.name} must be a whole number, got {row_seed!r}.",
                                     f"{source.name}:{image.name} 的种子必须是整数,收到的是 {row_seed!r}。") from None
            else:
                item_seeds = list(seeds or [None])
            items += [BatchItem(image=image, prompt=text, seed=seed, negative_prompt=negative) for seed in item_seeds]
    return items
