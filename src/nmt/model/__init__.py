"""Plain-PyTorch models (attention RNN seq2seq, Transformer) and batched greedy / beam search.

Imports torch only, so `from nmt.model import build_model, beam_search` works without the
training stack.
"""

from __future__ import annotations

from torch import nn

from nmt.config import ModelConfig
from nmt.model.decoder import Decoder, DecoderState
from nmt.model.encoder import Encoder, EncoderOutput
from nmt.model.search import SearchResult, beam_search, greedy_search
from nmt.model.seq2seq import Seq2Seq
from nmt.model.transformer import Transformer, TransformerState, build_transformer
from nmt.specials import PAD_ID

__all__ = [
    "DecoderState",
    "EncoderOutput",
    "SearchResult",
    "Seq2Seq",
    "Transformer",
    "TransformerState",
    "beam_search",
    "build_model",
    "count_parameters",
    "greedy_search",
]

INIT_RANGE = 0.1  # uniform(-0.1, 0.1) for weights, as in Luong et al. (2015)


def build_model(cfg: ModelConfig, src_vocab_size: int,
                trg_vocab_size: int) -> Seq2Seq | Transformer:
    """Map the `model` params section to an initialised `Seq2Seq` or `Transformer` (`arch`).

    The RNN path draws from the global RNG exactly as before `arch` existed, so a seed gives
    the same initial weights.
    """
    if cfg.arch == "transformer":
        return build_transformer(cfg, src_vocab_size, trg_vocab_size)
    directions = 2 if cfg.bidirectional else 1
    encoder = Encoder(rnn=cfg.rnn, vocab_size=src_vocab_size, emb_dim=cfg.emb_dim,
                      hidden=cfg.hidden, layers=cfg.enc_layers, bidirectional=cfg.bidirectional,
                      dropout=cfg.dropout)
    decoder = Decoder(rnn=cfg.rnn, vocab_size=trg_vocab_size, emb_dim=cfg.emb_dim,
                      enc_dim=encoder.out_dim, hidden=cfg.hidden * directions,
                      layers=cfg.dec_layers, attention=cfg.attention,
                      input_feeding=cfg.input_feeding, dropout=cfg.dropout,
                      tie_embeddings=cfg.tie_embeddings)
    model = Seq2Seq(encoder, decoder)
    init_weights(model, tied=cfg.tie_embeddings)
    return model


def init_weights(model: Seq2Seq, tied: bool) -> None:
    """Uniform weights, zero biases (LSTM forget gate 1), embeddings N(0, E^-0.5) when tied.

    With tied embeddings the output logits are h~ . e_w with h~ in [-1, 1]^E, so embeddings
    of norm ~1 keep the initial logits O(1).
    """
    for name, param in model.named_parameters():
        if ".embedding." in f".{name}":
            continue
        if "bias" in name.rsplit(".", 1)[-1]:
            nn.init.zeros_(param)
        else:
            nn.init.uniform_(param, -INIT_RANGE, INIT_RANGE)
    for rnn in (model.encoder.rnn, model.decoder.rnn):
        if isinstance(rnn, nn.LSTM):
            for name, param in rnn.named_parameters():
                if name.startswith("bias_ih"):
                    hidden = param.size(0) // 4
                    nn.init.ones_(param[hidden:2 * hidden])  # forget gate (gate order i, f, g, o)
    for emb in (model.encoder.embedding, model.decoder.embedding):
        if tied:
            nn.init.normal_(emb.weight, std=emb.embedding_dim ** -0.5)
        else:
            nn.init.uniform_(emb.weight, -INIT_RANGE, INIT_RANGE)
        emb.weight.data[PAD_ID].zero_()


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
