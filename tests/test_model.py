import torch

from core.model import DecoderState, ModelConfig, ShowAttendTell, caption_loss


def tiny_model(**kw) -> ShowAttendTell:
    torch.manual_seed(0)
    return ShowAttendTell(ModelConfig(vocab_size=12, encoder_dim=8, embed_dim=6, attention_dim=5, decoder_dim=7,
                                      dropout=0.0, **kw)).eval()


def batch():
    feats = torch.randn(3, 49, 8)
    caps = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 2, 0, 0], [1, 8, 9, 2, 0]])
    return feats, caps, torch.tensor([5, 3, 4])


def test_teacher_forcing_equals_stepwise_decoding():
    for deep in (True, False):
        model = tiny_model(deep_output=deep)
        feats, caps, lengths = batch()
        logits, alphas = model(feats, caps, lengths)
        state = model.init_state(feats)
        for t in range(caps.shape[1] - 1):
            step_logits, alpha, beta, state = model.step(caps[:, t], state)
            live = lengths - 1 > t
            assert torch.allclose(logits[live, t], step_logits[live], atol=1e-5)
            assert torch.allclose(alphas[live, t], alpha[live], atol=1e-6)
            assert torch.all(logits[~live, t] == 0) and bool(((beta > 0) & (beta < 1)).all())


def test_packed_forward_has_the_gradients_of_stepwise_teacher_forcing():
    """forward() hoists the word half of the LSTM gates and the output layer out of the time loop and runs
    its own LSTM cell: its loss and every parameter's gradient must equal T-1 plain `step` calls."""
    model = tiny_model()
    feats, caps, lengths = batch()
    loss, _ = caption_loss(*model(feats, caps, lengths), caps, lengths)
    loss.backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    state, step_logits, step_alphas = model.init_state(feats), [], []
    for t in range(caps.shape[1] - 1):
        logits, alpha, _, state = model.step(caps[:, t], state)
        live = (lengths - 1 > t).unsqueeze(1)
        step_logits.append(logits * live), step_alphas.append(alpha * live)
    stepwise, _ = caption_loss(torch.stack(step_logits, 1), torch.stack(step_alphas, 1), caps, lengths)
    stepwise.backward()
    assert torch.allclose(loss, stepwise, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(packed[name], p.grad, atol=1e-6), name
    assert packed["lstm.weight_ih"].abs().sum() > 0 and packed["classifier.weight"].abs().sum() > 0


def test_attention_rows_sum_to_one_and_state_reorders():
    model = tiny_model()
    feats, caps, _ = batch()
    state = model.init_state(feats)
    _, alpha, _, state = model.step(caps[:, 0], state)
    assert torch.allclose(alpha.sum(1), torch.ones(3))
    picked = state.index_select(torch.tensor([2, 2, 0]))
    assert isinstance(picked, DecoderState) and torch.equal(picked.h[0], state.h[2])


def test_loss_ignores_padding_and_penalises_uncovered_regions():
    model = tiny_model()
    feats, caps, lengths = batch()
    logits, alphas = model(feats, caps, lengths)
    loss, ce = caption_loss(logits, alphas, caps, lengths, alpha_c=1.0)
    assert loss > ce > 0
    garbage = logits.clone()
    garbage[caps[:, 1:] == 0] = 1e3                       # padded positions must not matter
    assert torch.allclose(caption_loss(garbage, alphas, caps, lengths, alpha_c=0.0)[0], ce)
    loss.backward()
    assert model.attention.encoder_proj.weight.grad.abs().sum() > 0


def test_config_round_trip():
    cfg = ModelConfig(vocab_size=10, encoder_dim=4, dropout=0.1)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_decoding_attention_equals_the_tanh_form_training_uses():
    # decoding scores energies as (2w)·σ(2z), training as w·tanh(z) + b: the same α, per image and per beam
    model = tiny_model()
    feats = torch.randn(3, 49, 8) * 4            # large energies: tanh saturates, where the forms could part
    att = model.attention.encoder_proj(feats)
    for rows in (3, 12):                         # one row per image, and 4 beams per image
        h = torch.randn(rows, 7) * 3
        with torch.enable_grad():
            trained = model.attention(att, h)
        with torch.inference_mode():
            decoded = model.attention(att, h)
        assert trained.requires_grad and not decoded.requires_grad
        assert torch.allclose(decoded, trained, rtol=0, atol=1e-6), (decoded - trained).abs().max()
