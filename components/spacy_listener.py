"""``rwkv_stream.RWKVListener.v1``: spaCy's own components (``tagger``, ``textcat``, ``ner``, ``spancat``...) read
the ``rwkv`` component's token vectors, as spacy-transformers' ``TransformerListener`` reads a transformer's.

Use it as the ``tok2vec`` of any built-in component::

    [components.tagger.model.tok2vec]
    @architectures = "rwkv_stream.RWKVListener.v1"
    width = 192          # the RWKV model's n_embd (omit it: the rwkv component sets it at initialize)
    upstream = "rwkv"    # the rwkv component's name, or "*"

In training, the ``rwkv`` component runs each batch once in :meth:`update` and hands every listener the
vectors of the batch's spaCy tokens (one ``[n_tokens, width]`` array per Doc, each token reading the model
token its alignment rule picks) with a callback that takes the listener's gradients back into the RWKV model.
In prediction, a listener reads ``doc.tensor``, which the ``rwkv`` component sets for every Doc it processes
(streamed fragments included: the vectors carry the stream's whole history). So ``rwkv`` must run before its
listeners, and when ``rwkv`` is in ``[training] frozen_components`` it must also be in
``annotating_components``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

from spacy.tokens import Doc
from spacy.util import registry
from thinc.api import Model
from thinc.types import Floats2d

Backprop = Callable[[list[Floats2d]], list[Doc]]
LISTENER_NAME = "rwkv-listener"


class RWKVListener(Model):
    """Proxy for the upstream ``rwkv`` component's token vectors (see the module docstring)."""

    name = LISTENER_NAME

    def __init__(self, upstream_name: str, width: int | None, grad_factor: float = 1.0) -> None:
        Model.__init__(self, name=self.name, forward=listener_forward, dims={"nO": width},
                       attrs={"grad_factor": grad_factor})
        self.upstream_name = upstream_name
        self._batch_id: int | None = None
        self._outputs: list[Floats2d] | None = None
        self._backprop: Backprop | None = None

    @classmethod
    def get_batch_id(cls, inputs: Iterable[Doc]) -> int:
        """A content hash of a batch, to tell whether the listener's component sees the batch it was fed."""
        return sum(sum(token.orth for token in doc) for doc in inputs)

    def receive(self, batch_id: int, outputs: list[Floats2d], backprop: Backprop) -> None:
        """Store the vectors of a training batch and the callback that backpropagates into rwkv."""
        self._batch_id = batch_id
        self._outputs = outputs
        self._backprop = backprop

    def verify_inputs(self, inputs: list[Doc]) -> None:
        if self._batch_id is None and self._outputs is None:
            raise ValueError(f"rwkv listener: no vectors received from the {self.upstream_name!r} component; "
                             "it must run (and be updated or annotating) before the components listening to it")
        batch_id = self.get_batch_id(inputs)
        if batch_id != self._batch_id:
            raise ValueError(f"rwkv listener: the batch ({batch_id}) is not the one the {self.upstream_name!r} "
                             f"component was updated on ({self._batch_id})")


def listener_forward(model: RWKVListener, docs: list[Doc], is_train: bool) -> tuple[list[Floats2d], Callable]:
    """Training: the vectors received for this batch (or ``doc.tensor`` when rwkv is frozen and annotating);
    prediction: ``doc.tensor``."""
    if is_train and model._batch_id is not None:
        model.verify_inputs(docs)
        assert model._outputs is not None and model._backprop is not None
        upstream, factor = model._backprop, float(model.attrs["grad_factor"])

        def backprop(d_outputs: list[Floats2d]) -> list[Doc]:
            return upstream(d_outputs if factor == 1.0 else [d * factor for d in d_outputs])

        return model._outputs, backprop
    return [_doc_vectors(model, doc, is_train) for doc in docs], _no_backprop


def _doc_vectors(model: RWKVListener, doc: Doc, is_train: bool) -> Floats2d:
    width = model.get_dim("nO")
    if doc.tensor.size == 0:
        if is_train and len(doc):
            raise ValueError(f"rwkv listener: doc.tensor is not set; a frozen {model.upstream_name!r} component "
                             "must also be listed in [training] annotating_components")
        return model.ops.alloc2f(len(doc), width)
    if doc.tensor.shape[1] != width:
        raise ValueError(f"rwkv listener: width is {width} but doc.tensor has {doc.tensor.shape[1]} columns "
                         f"(set width to the RWKV model's n_embd)")
    return cast(Floats2d, doc.tensor)


def _no_backprop(d_outputs: Any) -> list[Doc]:
    return []


@registry.architectures("rwkv_stream.RWKVListener.v1")
def rwkv_listener(
    width: int | None = None, upstream: str = "rwkv", grad_factor: float = 1.0
) -> Model[list[Doc], list[Floats2d]]:
    """The rwkv component's token vectors as a ``tok2vec`` layer. ``width``: the model's ``n_embd`` (``None``:
    set by the rwkv component's ``initialize``, which must then run, i.e. rwkv is not frozen);
    ``upstream``: the rwkv component's name or ``"*"``; ``grad_factor``: scales the gradient sent to rwkv."""
    return RWKVListener(upstream, width, grad_factor)
