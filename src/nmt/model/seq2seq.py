"""The attention seq2seq model: encode, init_state, step (search) and forward (training)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nmt.model.decoder import Decoder, DecoderState
from nmt.model.encoder import Encoder, EncoderOutput
from nmt.model.shapes import check_dtype, check_shapes


class EncoderDecoder(nn.Module):
    """What `Seq2Seq` and `nmt.model.Transformer` share: an encoder and a decoder, each with an
    `embedding`, the check of a padded source batch, and teacher-forced `forward`.

    Subclasses define `encode` and `init_state`; their decoders `embed`, run all target
    positions (`decoder(state, embedded)` -> features, state) and map features to `logits`.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    @property
    def src_vocab_size(self) -> int:
        return self.encoder.embedding.num_embeddings

    @property
    def trg_vocab_size(self) -> int:
        return self.decoder.embedding.num_embeddings

    @staticmethod
    def check_source(src: Tensor, src_lengths: Tensor) -> None:
        """Raise naming the argument unless src is (B, S) long and src_lengths (B,) long in
        [1, S] (the value check is skipped while compiling)."""
        check_shapes(("src", src, "B S"), ("src_lengths", src_lengths, "B"))
        check_dtype("src", src, torch.long)
        check_dtype("src_lengths", src_lengths, torch.long)
        if not torch.compiler.is_compiling():
            low, high = int(src_lengths.min()), int(src_lengths.max())
            if low < 1 or high > src.size(1):
                raise ValueError(f"src_lengths: expected values in [1, {src.size(1)}] "
                                 f"(S of src), got min {low}, max {high}")

    def forward(self, src: Tensor, src_lengths: Tensor, trg_in: Tensor) -> Tensor:
        """Teacher-forced scores.

        Args:
            src: source ids, shape (B, S), long.
            src_lengths: real source lengths, shape (B,), long.
            trg_in: decoder inputs (BOS y_1 ... y_{T-1}, PAD after), shape (B, T), long.
        Returns:
            raw logits (B, T, V); positions after a sentence's end are garbage for the loss to
            ignore (target PAD).
        """
        check_shapes(("src", src, "B S"), ("src_lengths", src_lengths, "B"),
                     ("trg_in", trg_in, "B T"))
        check_dtype("trg_in", trg_in, torch.long)
        state = self.init_state(self.encode(src, src_lengths))
        features, _ = self.decoder(state, self.decoder.embed(trg_in))  # (B, T, E or D)
        return self.decoder.logits(features)  # (B, T, V)


class Seq2Seq(EncoderDecoder):
    """Encoder-decoder with attention; plain PyTorch, no training-stack imports.

    `forward` returns raw logits for a label-smoothed cross entropy; `step` returns log
    probabilities for search. Both go through `Decoder.step` unless the decoder's fast path
    (Luong/none attention without input feeding) runs all positions in one RNN call.
    """

    encoder: Encoder
    decoder: Decoder

    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__(encoder, decoder)

    def encode(self, src: Tensor, src_lengths: Tensor, pack: bool = True) -> EncoderOutput:
        """Encode a padded source batch.

        Args:
            src: token ids, shape (B, S), long, PAD_ID after each sentence.
            src_lengths: real lengths, shape (B,), long, each in [1, S].
            pack: False skips packing so torch.export can trace the encoder; then it is exact
                only for batches without padding (see `Encoder.forward`).
        Returns:
            EncoderOutput: outputs (B, S, H_enc), mask (B, S), final hidden/cell (B, H_enc).
        """
        self.check_source(src, src_lengths)
        return self.encoder(src, src_lengths, pack=pack)

    def init_state(self, encoder_output: EncoderOutput) -> DecoderState:
        """Initial decoder state (rows B) from the encoder output."""
        return self.decoder.init_state(encoder_output)

    def step(self, state: DecoderState,
             prev_tokens: Tensor) -> tuple[Tensor, DecoderState, Tensor]:
        """Advance every row by one target token.

        Args:
            state: decoder state with B rows (after `init_state`, `index_select` or `step`).
            prev_tokens: previous target token per row (BOS_ID first), shape (B,), long.
        Returns:
            log_probs (B, V), the new state, attention weights (B, S) (zeros for `none`).
        """
        check_shapes(("state.attn_vec", state.attn_vec, "B E"), ("prev_tokens", prev_tokens, "B"))
        attn_vec, state, weights = self.decoder.step(state, self.decoder.embed(prev_tokens))
        log_probs = self.decoder.logits(attn_vec).log_softmax(dim=-1)  # (B, V)
        return log_probs, state, weights
