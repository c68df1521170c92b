"""`surgical-peft predict --model M --adapter A [--adapter B ...] DATA --output predictions.csv`: every image through
every adapter, one batched `surgical_peft.fan_out` pass per batch (the frozen layers before the adapters' blocks run
once), into one CSV row per image and adapter; the accuracy of each adapter is printed when the data has labels.

DATA is an imagefolder directory (one folder per class: the folder names are the true labels), a directory of
images, image files, a Hub dataset id (from the local cache when offline) or `digits`. The labels an adapter predicts
are its model's (`config.id2label`); accuracy compares them with the data's labels by name. The CSV is written to a
temporary file beside `--output` and renamed over it once complete: an existing file (or a symlink) at that name is
replaced, never written through.
"""

from __future__ import annotations

import argparse
import csv
import io
import warnings
from pathlib import Path
from typing import Any

from ...argparser import add_dataclass_arguments, whole_number
from ...errors import InputError
from ..arguments import MODEL_HELP, DataArguments, ModelArguments

__all__ = ["COMMAND"]

_COLUMNS = ["image", "adapter", "predicted_label", "probability", "true_label"]


class Predict:
    help = "predict labels with one or more adapters into a CSV file, one batched pass for all adapters"
    description = (
        "Predict the label of every image with every adapter, in one batched pass per batch (the frozen\n"
        "layers before the adapters' blocks run once for all of them), and write one CSV row per image and\n"
        "adapter: the predicted label and its probability, and the true label when the data has one. Prints\n"
        "each adapter's accuracy when the data has labels."
    )
    epilog = (
        "examples:\n"
        "  surgical-peft predict --model demo-resnet \\\n"
        "      --adapter outputs/demo-resnet-digits-contrast-stage1-seed0/adapter digits --output predictions.csv\n"
        "  surgical-peft predict --model microsoft/resnet-50 --adapter ./fog/adapter --adapter user/snow-adapter \\\n"
        "      ./my-images --output predictions.csv\n"
        "  surgical-peft predict --model ./my-model --adapter ./adapter photo1.jpg photo2.jpg --output out.csv"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "data",
            metavar="DATA",
            nargs="+",
            help="an imagefolder directory (one folder per class), a directory of images, image files, a Hub dataset "
            "id (cached when offline) or digits",
        )
        parser.add_argument("--model", required=True, help=MODEL_HELP)
        parser.add_argument(
            "--adapter",
            action="append",
            required=True,
            metavar="ADAPTER",
            help="an adapter directory (saved by train or save_pretrained) or a Hub id (cached when offline); repeat "
            "it for several adapters of the same model",
        )
        parser.add_argument("--output", required=True, type=Path, help="the CSV file to write")
        parser.add_argument("--batch-size", type=whole_number(1), default=32, help="images per batch")
        reading = ("split", "image_column", "label_column", "skip_unreadable_images", "image_size")
        add_dataclass_arguments(parser, DataArguments, include=reading)
        add_dataclass_arguments(parser, ModelArguments, include=("cache_dir",))

    def run(self, args: argparse.Namespace) -> None:
        from ..target import image_size_for

        _check_output(args.output)
        if len(set(args.adapter)) < len(args.adapter):
            raise InputError(f"--adapter names the same adapter more than once: {args.adapter}.")
        images = _load_images(args)
        model, loaded = _load_model_and_adapters(args)
        names = [f"adapter{index}" for index in range(1, len(args.adapter) + 1)]
        id2label = model.base_model.model.config.id2label
        image_size = image_size_for(loaded, images, args.image_size)
        processed = loaded.preprocess(images.select_columns(["image", "label"]), image_size)
        rows = _predict(model, names, images, processed, args.batch_size, id2label)
        sources = dict(zip(names, args.adapter, strict=True))
        _write_csv(args.output, [{**row, "adapter": sources[row["adapter"]]} for row in rows])
        _print_accuracy(rows, names, sources, list(id2label.values()))
        adapters = f"{len(names)} adapter{'s' if len(names) > 1 else ''}"
        print(f"Wrote {len(rows)} predictions ({images.num_rows} images x {adapters}) to {args.output}.")


def _check_output(output: Path) -> None:
    """An `InputError` for an `--output` that no file can be written to, before anything runs."""
    if output.is_dir():
        raise InputError(f"--output {output} is a directory; pass the path of the CSV file to write.")
    existing = next(path for path in output.absolute().parents if path.exists())
    if not existing.is_dir():
        raise InputError(f"--output {output}: {existing} is a file, not a directory.")


def _image_files(data: list[str]) -> list[Path] | None:
    """The image files that DATA names (files, or a directory of images without subfolders); `None` for a dataset."""
    from PIL import Image

    paths = [Path(item) for item in data]
    if len(paths) == 1 and paths[0].is_dir():
        if any(child.is_dir() for child in paths[0].iterdir()):
            return None  # an imagefolder dataset: one folder per class
        extensions = set(Image.registered_extensions())
        paths = sorted(child for child in paths[0].iterdir() if child.suffix.lower() in extensions)
        if not paths:
            raise InputError(f"{data[0]} holds no image files ({', '.join(sorted(extensions)[:5])}, ...).")
        return paths
    if all(path.is_file() for path in paths):
        return paths
    if len(paths) == 1:
        return None  # a Hub dataset id or digits
    missing = [str(path) for path in paths if not path.is_file()]
    raise InputError(f"DATA takes one dataset or image files; not files: {', '.join(missing[:3])}.")


def _load_images(args: argparse.Namespace) -> Any:
    """DATA as a `datasets.Dataset` with `image`, `label` (a `ClassLabel`, or `None` for image files) and `id` (the
    image's file, or its row in the dataset)."""
    import datasets
    from PIL import Image, UnidentifiedImageError

    from ...experiments.data import load_image_dataset

    files = _image_files(args.data)
    if files is None:
        dataset = load_image_dataset(
            args.data[0],
            split=args.split,
            image_column=args.image_column,
            label_column=args.label_column,
            skip_unreadable=args.skip_unreadable_images,
        )
        stored = dataset.cast_column("image", datasets.Image(decode=False))["image"]
        ids = [image.get("path") or f"{args.data[0]}[{row}]" for row, image in enumerate(stored)]
        return dataset.add_column("id", ids)
    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError) as error:
            raise InputError(f"Cannot read image {path}: {error}") from error
    columns = {"image": [str(path) for path in files], "label": [None] * len(files), "id": [str(p) for p in files]}
    return datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())


def _load_model_and_adapters(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model with every adapter (`adapter1`, `adapter2`, ...), in eval mode, and the `LoadedModel` it came
    from."""
    from peft import PeftModel

    from ..models import load_model

    for source in args.adapter:
        looks_local = Path(source).is_absolute() or source.startswith((".", "~"))
        if (looks_local or Path(source).exists()) and not Path(source).expanduser().is_dir():
            problem = "it is a file" if Path(source).expanduser().exists() else "there is no such directory"
            raise InputError(f"Cannot load adapter {source!r}: {problem}. Pass an adapter directory or a Hub id.")
    loaded = load_model(args.model, cache_dir=args.cache_dir)
    model = None
    for index, source in enumerate(args.adapter, start=1):
        try:
            with warnings.catch_warnings():  # PEFT 0.21 reads transformers' deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
                if model is None:
                    model = PeftModel.from_pretrained(loaded.model, source, adapter_name=f"adapter{index}")
                else:
                    model.load_adapter(source, adapter_name=f"adapter{index}")
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise InputError(f"Cannot load adapter {source!r} onto {args.model}: {error}") from error
    return model.eval(), loaded


def _predict(
    model: Any, names: list[str], images: Any, processed: Any, batch_size: int, id2label: dict[int, str]
) -> list[dict[str, Any]]:
    """One row per image and adapter: the predicted label, its probability and the true label (`None` if unknown);
    `processed` is `images` as the model's inputs."""
    import torch

    from ...serving.fan_out import fan_out

    labels = images.features["label"]
    ids = images["id"]
    rows = []
    for start in range(0, images.num_rows, batch_size):
        batch = processed[start : start + batch_size]
        outputs = fan_out(model, names, pixel_values=batch["pixel_values"])
        true_labels = [labels.int2str(label) if label is not None else None for label in batch["labels"]]
        image_ids = ids[start : start + batch_size]
        for name in names:
            probabilities, predicted = torch.softmax(outputs[name].logits.float(), dim=-1).max(dim=-1)
            rows += [
                {
                    "image": image_id,
                    "adapter": name,
                    "predicted_label": id2label[int(index)],
                    "probability": f"{float(probability):.4f}",
                    "true_label": true_label,
                }
                for image_id, index, probability, true_label in zip(
                    image_ids, predicted, probabilities, true_labels, strict=True
                )
            ]
    return rows


def _write_csv(output: Path, rows: list[dict[str, Any]]) -> None:
    """The CSV, written to a temporary file beside `output` and renamed over it when complete
    (`surgical_peft.files.write_file`: a symlink at `output` is replaced, never written through)."""
    from ...files import write_file

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=_COLUMNS)
    writer.writeheader()
    writer.writerows({**row, "true_label": row["true_label"] or ""} for row in rows)
    write_file(output, text.getvalue())


def _print_accuracy(
    rows: list[dict[str, Any]], names: list[str], sources: dict[str, str], model_labels: list[str]
) -> None:
    """Each adapter's accuracy, where the data has labels that the model's labels name."""
    truths = {row["true_label"] for row in rows if row["true_label"] is not None}
    if not truths:
        return
    if not {_key(name) for name in truths} & {_key(name) for name in model_labels}:
        print(
            f"Accuracy: not measured: the model's labels ({', '.join(model_labels[:5])}, ...) name none of the "
            f"data's ({', '.join(sorted(truths)[:5])}, ...)."
        )
        return
    for name in names:
        own = [row for row in rows if row["adapter"] == name and row["true_label"] is not None]
        correct = sum(_key(row["predicted_label"]) == _key(row["true_label"]) for row in own)
        print(f"{sources[name]}: accuracy {correct / len(own):.1%} ({correct}/{len(own)})")


def _key(name: str) -> str:
    """A label name as names are compared (in lower case, as `surgical_peft.labels` compares them)."""
    return str(name).lower()


COMMAND = Predict()
