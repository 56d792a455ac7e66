"""How the DistilRNN's recurrent layers step through a batch, besides torch's own
kernels: packing on the host, the ReLU RNN stepped in Python over packed
sequences (a faster backward on CPU), and every cell (ReLU/tanh RNN, GRU, LSTM,
one- or two-way) stepped over the padded time axis under a mask, which
torch.compile traces into one graph per batch shape.

Torch only, like model.py, which imports it."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


def run_rnn(rnn, embedded, lengths, host_lengths=None, python_steps=True, pad=None):
    """(h_n, outputs) of rnn over a right-padded batch embedded (B, T, width), each
    row read up to lengths[b]; outputs (B, T, features) with the pads filled with
    pad, or None when no pad is given. In eager mode the sequences are packed from
    host_lengths (without them, lengths are copied to the host: a sync on CUDA), and
    a one-way ReLU RNN training on a CPU runs packed_relu_rnn (python_steps);
    under torch.compile the padded, masked steps, which it traces without a break."""
    if torch.compiler.is_compiling():
        outputs, h_n = padded_rnn(rnn, embedded, lengths)
        if pad is None:
            return h_n, None
        real = torch.arange(embedded.size(1), device=embedded.device)[None, :] < lengths[:, None]
        return h_n, outputs.masked_fill(~real[:, :, None], pad)
    packed = pack(embedded, lengths, lengths.cpu() if host_lengths is None else host_lengths)
    if python_steps and torch.is_grad_enabled() and packed.data.device.type == "cpu" and steps_in_python(rnn):
        outputs, h_n = packed_relu_rnn(rnn, packed)
    else:
        outputs, h_n = rnn(packed)
    # total_length: the batch's (padded) width, so the shapes stay those of the input
    return h_n, None if pad is None else unpack(outputs, pad, embedded.size(1))


def pack(embedded, lengths, host_lengths):
    """pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False),
    planned on the host: the sort of the lengths, which the packing needs there, is
    made from host_lengths, and only its order goes to the device, without blocking.
    torch's own version copies the device's lengths back to the host and the order to
    the device with a wait, each a host sync per step on CUDA."""
    sorted_lengths, order = torch.sort(host_lengths.to("cpu", torch.int64), descending=True)
    if embedded.device.type == "cuda":
        order = order.pin_memory()
    order = order.to(embedded.device, non_blocking=True)
    packed = pack_padded_sequence(embedded.index_select(0, order), sorted_lengths, batch_first=True)
    return PackedSequence(packed.data, packed.batch_sizes, order, torch.empty_like(order).scatter_(
        0, order, torch.arange(order.numel(), device=order.device)))


def unpack(packed, padding_value, total_length):
    """pad_packed_sequence(packed, batch_first=True, ...)[0], without its read of the
    order back to the host (a sync on CUDA): unpadded in the packing's order, then
    put back in the batch's on the device."""
    padded, _ = pad_packed_sequence(PackedSequence(packed.data, packed.batch_sizes), batch_first=True,
                                    padding_value=padding_value, total_length=total_length)
    return padded if packed.unsorted_indices is None else padded.index_select(0, packed.unsorted_indices)


def steps_in_python(rnn):
    """Whether packed_relu_rnn can stand in for rnn: a one-way ReLU RNN with biases."""
    return isinstance(rnn, nn.RNN) and rnn.nonlinearity == "relu" and not rnn.bidirectional and rnn.bias


def packed_relu_rnn(rnn, packed):
    """rnn(packed) for a one-way ReLU nn.RNN, as (packed outputs, h_n), computed
    step by step the way torch's CPU kernel does: the input's products for all steps
    at once, then per step h = relu(h W_hh^T + b_hh + that step's rows), the batch
    shrinking as sentences end. The same products in the same order give the same
    numbers, bit for bit, forward and backward, in float32 and under bf16 autocast
    (tests/test_distil.py). What differs is the backward's bookkeeping: the kernel
    takes each step's rows with narrow, whose gradient is a zero tensor the size of
    the whole packed input, written once per step; split here takes them all at
    once, and its gradient is one concatenation (bench.py rnn)."""
    sizes = packed.batch_sizes.tolist()  # on the host by construction: no sync
    data, finals = packed.data, []
    for layer in range(rnn.num_layers):
        w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{name}_l{layer}")
                                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        step_inputs = F.linear(data, w_ih, b_ih).split(sizes)
        h = packed.data.new_zeros(sizes[0], rnn.hidden_size)  # the kernel's h_0: zeros in the input's dtype
        outputs, ended = [], []  # ended: the final states of sentences already over, last ones first
        for step, size in enumerate(sizes):
            if size < h.size(0):
                ended.append(h[size:])
                h = h[:size]
            h = torch.relu(F.linear(h, w_hh, b_hh) + step_inputs[step])
            outputs.append(h)
        finals.append(torch.cat([h] + ended[::-1]))
        data = torch.cat(outputs)
        if rnn.dropout and rnn.training and layer < rnn.num_layers - 1:
            data = F.dropout(data, rnn.dropout, training=True)
    h_n = torch.stack(finals)
    if packed.unsorted_indices is not None:
        h_n = h_n.index_select(1, packed.unsorted_indices)
    return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), h_n


def _cell(rnn, x_part, h, c, w_hh, b_hh):
    """One step of rnn's cell from the input's share of the gates (x W_ih^T + b_ih),
    as torch documents each: returns (h, c); c is None but for the LSTM."""
    hidden = F.linear(h, w_hh, b_hh)
    if isinstance(rnn, nn.LSTM):
        i, f, g, o = (x_part + hidden).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if isinstance(rnn, nn.GRU):
        x_r, x_z, x_n = x_part.chunk(3, dim=-1)
        h_r, h_z, h_n = hidden.chunk(3, dim=-1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    act = torch.relu if rnn.nonlinearity == "relu" else torch.tanh
    return act(x_part + hidden), None


def reverse_each(x, lengths):
    """Each row's first lengths[b] steps in reverse order, its pads left in place:
    the input a backward direction reads (and, applied again, its outputs' order)."""
    T = x.size(1)
    steps = torch.arange(T, device=x.device)
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    return x.gather(1, index[:, :, None].expand_as(x))


def padded_rnn(rnn, x, lengths):
    """rnn over a right-padded batch x (B, T, in), each row read up to lengths[b]:
    (outputs (B, T, directions * hidden), h_n (layers * directions, B, hidden)) as
    rnn(packed) gives them (h_n is (h_n, c_n) for an LSTM). A step past a row's end
    keeps its state, so the final state is the one after its last real token; the
    outputs at pads are left to the caller to mask. Everything stays on the device
    and every shape is fixed by x's, so one compiled graph serves a batch shape."""
    B, T, _ = x.shape
    real = (torch.arange(T, device=x.device)[None, :] < lengths[:, None])[:, :, None]  # (B, T, 1)
    directions = 2 if rnn.bidirectional else 1
    lstm = isinstance(rnn, nn.LSTM)
    finals, cells = [], []
    for layer in range(rnn.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh, b_ih, b_hh = (getattr(rnn, name + suffix, None)
                                      for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            source = reverse_each(x, lengths) if direction else x
            x_parts = F.linear(source, w_ih, b_ih)
            h = x.new_zeros(B, rnn.hidden_size, dtype=x_parts.dtype)
            c = torch.zeros_like(h) if lstm else None
            steps = []
            for t in range(T):
                h_new, c_new = _cell(rnn, x_parts[:, t], h, c, w_hh, b_hh)
                h = torch.where(real[:, t], h_new, h)
                if lstm:
                    c = torch.where(real[:, t], c_new, c)
                steps.append(h)
            out = torch.stack(steps, dim=1)
            outputs.append(reverse_each(out, lengths) if direction else out)
            finals.append(h)
            cells.append(c)
        x = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
        if rnn.dropout and rnn.training and layer < rnn.num_layers - 1:
            x = F.dropout(x, rnn.dropout, training=True)
    h_n = torch.stack(finals)
    return x, ((h_n, torch.stack(cells)) if lstm else h_n)
