"""The task of a base model, as a model card states it: its Hub `pipeline_tag` and how to load the base.

transformers task models are looked up in transformers' own Auto mappings (`ResNetForImageClassification` is in
`AutoModelForImageClassification`'s, `GPT2LMHeadModel` in `AutoModelForCausalLM`'s); a plain timm model is an image
classifier loaded with `timm.create_model`. Any other model has no known task.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
    >>> task = task_of(BertForSequenceClassification(config))
    >>> task.pipeline_tag, task.load("bert-base-uncased")
    ('text-classification', 'AutoModelForSequenceClassification.from_pretrained("bert-base-uncased")')
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

__all__ = ["Task", "task_of"]


class Task(NamedTuple):
    """A model's Hub `pipeline_tag` (`None` when unknown) and the Python that loads it."""

    pipeline_tag: str | None
    import_line: str  # e.g. "from transformers import AutoModelForImageClassification"; "" when none is needed
    loader: str  # a format string of the call that loads the base from `{base}` (with `{keywords}` for more)

    def load(self, base: str, keywords: str = "") -> str:
        """The call that loads the base model `base` (a Hub id or path), with more `keywords` (e.g. `"id2label=..."`)
        where the loader takes them (transformers' Auto classes)."""
        return self.loader.format(base=base, keywords=f", {keywords}" if keywords else "")


# (pipeline_tag, Auto class, the name of its mapping in `transformers.models.auto.modeling_auto`), most specific
# first: a class listed under several Auto classes gets the first.
_TRANSFORMERS_TASKS = (
    ("image-classification", "AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("text-classification", "AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("text-generation", "AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("token-classification", "AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("question-answering", "AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("fill-mask", "AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("text2text-generation", "AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("audio-classification", "AutoModelForAudioClassification", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
    ("image-segmentation", "AutoModelForSemanticSegmentation", "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES"),
    ("object-detection", "AutoModelForObjectDetection", "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES"),
    ("feature-extraction", "AutoModel", "MODEL_MAPPING_NAMES"),  # a bare backbone (`BertModel`)
)

_TIMM = Task("image-classification", "import timm", 'timm.create_model("hf-hub:{base}", pretrained=True)')


def _class_names(mapping: dict[str, str | tuple[str, ...]]) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update((value,) if isinstance(value, str) else value)
    return names


def task_of(model: nn.Module) -> Task:
    """The task of `model` (a base model, not a `PeftModel`), from its class.

    Example:
        >>> import torch
        >>> task = task_of(torch.nn.Linear(2, 2))
        >>> task.pipeline_tag, task.load("me/base")
        (None, '...  # the base model (Linear), as it was before fine-tuning')
    """
    if type(model).__module__.startswith("timm."):
        return _TIMM
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for pipeline_tag, auto_class, mapping in _TRANSFORMERS_TASKS:
        if name in _class_names(getattr(modeling_auto, mapping, {})):
            loader = f'{auto_class}.from_pretrained("{{base}}"{{keywords}})'
            return Task(pipeline_tag, f"from transformers import {auto_class}", loader)
    return Task(None, "", f"...  # the base model ({name}), as it was before fine-tuning")
