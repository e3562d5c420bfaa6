"""Pretraining data as composable transforms: MLM masking, sentence pairs, causal targets.

Every transform is a pure function of its inputs and (where it samples) an explicit
``fnllm.random`` key, so batches are reproducible, vmappable and compilable:

- :func:`mlm_mask`: BERT's 80/10/10 masked-language-model corruption.
- :func:`sentence_pairs`: ``[CLS] A [SEP] B [SEP]`` with a next-sentence (nsp) or
  sentence-order (sop) label; :func:`truncate_lengths`, :func:`pad_sequences`.
- :func:`causal_targets`, :func:`instruction_targets`, :func:`pack`: causal-LM targets
  (aligned with the logits) and document packing.
- :class:`Corpus`, :func:`train_tokenizer`, :func:`load_tokenizer`, :func:`gpt_batches`,
  :func:`bert_batches`, :func:`bert_pretraining_batch`: from text to deterministic,
  resumable batches.
- :func:`read_labelled`, :func:`encode_texts`, :func:`stratified_split`, :func:`length_batches`,
  :func:`load_vader`: text classification data (CSV/JSONL, the VADER movie reviews).
"""

from fnllm.data.causal import causal_targets, instruction_targets, pack
from fnllm.data.corpus import Corpus, split_sentences
from fnllm.data.corpus_text import DEFAULT_DOCUMENTS, default_documents
from fnllm.data.loaders import Batches, bert_batches, gpt_batches
from fnllm.data.masking import mlm_mask
from fnllm.data.pairs import pad_sequences, sentence_pairs, truncate_lengths
from fnllm.data.pretraining import bert_pretraining_batch
from fnllm.data.text_classification import (
    encode_texts,
    length_batches,
    read_labelled,
    stratified_split,
)
from fnllm.data.tokenizers import load_tokenizer, train_tokenizer
from fnllm.data.vader import load_vader, vader_path

__all__ = [
    "DEFAULT_DOCUMENTS",
    "Batches",
    "Corpus",
    "bert_batches",
    "bert_pretraining_batch",
    "causal_targets",
    "default_documents",
    "encode_texts",
    "gpt_batches",
    "instruction_targets",
    "length_batches",
    "load_tokenizer",
    "load_vader",
    "mlm_mask",
    "pack",
    "pad_sequences",
    "read_labelled",
    "sentence_pairs",
    "split_sentences",
    "stratified_split",
    "train_tokenizer",
    "truncate_lengths",
    "vader_path",
]
