"""Bundled data sets, users' own files and batching."""

from fnn.data.batching import batches as batches
from fnn.data.batching import num_batches as num_batches
from fnn.data.digits import Split as Split
from fnn.data.digits import load_digits as load_digits
from fnn.data.files import encode_texts as encode_texts
from fnn.data.files import load_arrays as load_arrays
from fnn.data.files import load_csv as load_csv
from fnn.data.files import load_image_folder as load_image_folder
from fnn.data.files import load_text_folder as load_text_folder
from fnn.data.files import num_text_ids as num_text_ids
from fnn.data.text import TextSplit as TextSplit
from fnn.data.text import Vocab as Vocab
from fnn.data.text import default_corpus as default_corpus
from fnn.data.text import load_text as load_text
from fnn.data.text import num_sequence_batches as num_sequence_batches
from fnn.data.text import sequence_batches as sequence_batches

__all__ = ["batches", "num_batches", "Split", "load_digits", "encode_texts", "load_arrays",
           "load_csv", "load_image_folder", "load_text_folder", "num_text_ids", "TextSplit",
           "Vocab", "default_corpus", "load_text", "num_sequence_batches", "sequence_batches"]
