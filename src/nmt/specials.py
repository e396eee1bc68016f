"""Special token ids shared by every tokenizer, the model and the search.

They are fixed so that tokenizer files, checkpoints and exported models agree without extra
metadata: sentencepiece is trained with exactly these ids, and the character vocabulary puts them
first. Sequences are stored without BOS/EOS; the data module adds them.
"""

PAD_ID = 0  # padding; ignored by the loss and masked in attention
UNK_ID = 1  # unknown piece or character
BOS_ID = 2  # beginning of sentence: first decoder input
EOS_ID = 3  # end of sentence: last decoder target; search stops on it
SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>")
