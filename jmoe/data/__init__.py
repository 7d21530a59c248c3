"""Embedded corpus and batching."""

from jmoe.data.batches import eval_batches, train_batch
from jmoe.data.corpus import Corpus, CorpusError, load_corpus, stdlib_corpus, text_corpus, tokenize_corpus

__all__ = ["Corpus", "CorpusError", "eval_batches", "load_corpus", "stdlib_corpus", "text_corpus", "tokenize_corpus", "train_batch"]
