// Fused per-token log-probs on CPU (see anytime_kernels/logprobs.py for the maths and the API).
//
// logits = hidden @ weight.T / temperature is never held whole: rows are taken in blocks of
// kRowBlock and the vocabulary in tiles of kVocabTile, so the working set is a few
// [kRowBlock, kVocabTile] fp32 tiles per thread, whatever M and V are. Threads split the vocabulary
// tiles of one row block (at::parallel_for; each thread runs its GEMMs single-threaded), which keeps
// small M fully parallel and gives every thread disjoint rows of grad_weight.
//
// Forward: every tile yields per-row (max, sum of exp, sum of exp * logit) of its slice; a serial
// log-sum-exp merge over tiles gives lse and the entropy lse - E[z]. The thread whose tile holds a
// row's target writes that row's target logit (each target lies in exactly one tile: no race).
//
// Backward recomputes each tile: with p = exp(z - lse),
//   dL/dz = g_lp * (onehot(target) - p) - g_ent * p * (z - mean_z),    mean_z = lse - entropy,
// then grad_hidden += dz @ W_tile / T (per-thread partials, summed after the block) and
// grad_weight[tile] += dz.T @ h_block / T. Accumulation is fp32 whatever the input dtype; grad_hidden
// comes back in fp32 (the wrapper scatter-adds it over repeated rows before casting).
//
// The Python wrapper validates inputs, gathers hidden[rows], and zeroes g_lp/g_ent on ignored
// targets, so these ops see contiguous [M, H] rows and in-range or -100 targets.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace anytime_kernels {
namespace {

constexpr int64_t kRowBlock = 512;
constexpr int64_t kVocabTile = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_operands(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && weight.dim() == 2, "hidden and weight must be 2-D, got shapes ",
                    hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK_VALUE(hidden.size(1) == weight.size(1), "hidden [M, H] and weight [V, H] disagree on H: ",
                    hidden.sizes(), " vs ", weight.sizes());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == hidden.size(0), "targets must be [", hidden.size(0),
                    "], got shape ", targets.sizes());
  TORCH_CHECK_VALUE(hidden.scalar_type() == weight.scalar_type(), "hidden and weight must share a dtype, got ",
                    hidden.scalar_type(), " and ", weight.scalar_type());
}

// Weight rows [v0, v0 + count) as fp32: a view for fp32 weights, else converted into `scratch`.
at::Tensor weight_tile_fp32(const at::Tensor& weight, int64_t v0, int64_t count, at::Tensor& scratch) {
  at::Tensor tile = weight.narrow(0, v0, count);
  if (weight.scalar_type() == at::kFloat) return tile;
  at::Tensor out = scratch.narrow(0, 0, count * weight.size(1)).view({count, weight.size(1)});
  out.copy_(tile);
  return out;
}

// First `rows * cols` elements of a flat buffer as a contiguous [rows, cols] matrix.
at::Tensor as_matrix(at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

std::vector<at::Tensor> fused_logprobs_forward_cpu(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                   const at::Tensor& targets_in, double temperature,
                                                   bool compute_entropy) {
  check_operands(hidden_in, weight_in, targets_in);
  // Detached: the worker threads of at::parallel_for run with grad mode on, and out= ops refuse
  // operands that require grad (the autograd wrapper lives in Python).
  const at::Tensor hidden = hidden_in.detach().contiguous();
  const at::Tensor weight = weight_in.detach().contiguous();
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  const int64_t num_rows = hidden.size(0), vocab = weight.size(0), width = hidden.size(1);
  const auto fp32 = hidden.options().dtype(at::kFloat);
  at::Tensor logprobs = at::zeros({num_rows}, fp32);
  at::Tensor entropy = compute_entropy ? at::zeros({num_rows}, fp32) : at::empty({0}, fp32);
  at::Tensor lse = at::zeros({num_rows}, fp32);
  if (num_rows == 0) return {logprobs, entropy, lse};

  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const int64_t num_tiles = ceil_div(vocab, kVocabTile);
  const int64_t* target_ptr = targets.data_ptr<int64_t>();

  for (int64_t row0 = 0; row0 < num_rows; row0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, num_rows - row0);
    const at::Tensor block = hidden.narrow(0, row0, rows).to(at::kFloat);
    at::Tensor tile_max = at::empty({num_tiles, rows}, fp32);
    at::Tensor tile_sum = at::empty({num_tiles, rows}, fp32);
    at::Tensor tile_weighted = compute_entropy ? at::empty({num_tiles, rows}, fp32) : at::Tensor();
    at::Tensor target_logit = at::zeros({rows}, fp32);
    float* target_logit_ptr = target_logit.data_ptr<float>();

    at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
      at::Tensor logits_buf = at::empty({rows * kVocabTile}, fp32);
      at::Tensor exp_buf = at::empty({rows * kVocabTile}, fp32);
      at::Tensor weight_buf = at::empty({kVocabTile * width}, fp32);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t v0 = tile * kVocabTile;
        const int64_t count = std::min(kVocabTile, vocab - v0);
        at::Tensor logits = as_matrix(logits_buf, rows, count);
        at::Tensor exps = as_matrix(exp_buf, rows, count);
        at::mm_out(logits, block, weight_tile_fp32(weight, v0, count, weight_buf).t());
        logits.mul_(inv_temperature);
        at::Tensor row_max = tile_max[tile];
        at::amax_out(row_max, logits, {1});
        at::sub_out(exps, logits, row_max.unsqueeze(1));
        exps.exp_();
        at::Tensor row_sum = tile_sum[tile];
        at::sum_out(row_sum, exps, {1});
        if (compute_entropy) {
          exps.mul_(logits);
          at::Tensor row_weighted = tile_weighted[tile];
          at::sum_out(row_weighted, exps, {1});
        }
        const float* logit_ptr = logits.data_ptr<float>();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t local = target_ptr[row0 + r] - v0;
          if (local >= 0 && local < count) target_logit_ptr[r] = logit_ptr[r * count + local];
        }
      }
    });

    const at::Tensor row_max = tile_max.amax(0);
    const at::Tensor rescale = (tile_max - row_max.unsqueeze(0)).exp_();
    const at::Tensor row_sum = (tile_sum * rescale).sum(0);
    const at::Tensor block_lse = row_max + row_sum.log();
    const at::Tensor valid = targets.narrow(0, row0, rows).ne(-100);
    lse.narrow(0, row0, rows).copy_(block_lse);
    logprobs.narrow(0, row0, rows).copy_(at::where(valid, target_logit - block_lse, 0.0));
    if (compute_entropy) {
      const at::Tensor mean_logit = (tile_weighted * rescale).sum(0) / row_sum;
      entropy.narrow(0, row0, rows).copy_(at::where(valid, block_lse - mean_logit, 0.0));
    }
  }
  return {logprobs, entropy, lse};
}

std::vector<at::Tensor> fused_logprobs_backward_cpu(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                    const at::Tensor& targets_in, const at::Tensor& lse_in,
                                                    const std::optional<at::Tensor>& mean_logit_in,
                                                    const at::Tensor& grad_logprobs_in,
                                                    const std::optional<at::Tensor>& grad_entropy_in,
                                                    double temperature, bool need_hidden, bool need_weight) {
  check_operands(hidden_in, weight_in, targets_in);
  const bool has_entropy_grad = grad_entropy_in.has_value() && grad_entropy_in->defined();
  TORCH_CHECK_VALUE(!has_entropy_grad || (mean_logit_in.has_value() && mean_logit_in->defined()),
                    "grad_entropy needs mean_logit");
  // Detached: the worker threads of at::parallel_for run with grad mode on, and out= ops refuse
  // operands that require grad (the autograd wrapper lives in Python).
  const at::Tensor hidden = hidden_in.detach().contiguous();
  const at::Tensor weight = weight_in.detach().contiguous();
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const at::Tensor grad_logprobs = grad_logprobs_in.to(at::kFloat).contiguous();
  const at::Tensor grad_entropy = has_entropy_grad ? grad_entropy_in->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor mean_logit = has_entropy_grad ? mean_logit_in->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t num_rows = hidden.size(0), vocab = weight.size(0), width = hidden.size(1);
  const auto fp32 = hidden.options().dtype(at::kFloat);

  // An op's Tensor[] result cannot hold undefined tensors: gradients not asked for come back empty.
  at::Tensor grad_hidden = need_hidden ? at::zeros({num_rows, width}, fp32) : at::empty({0}, fp32);
  at::Tensor grad_weight = need_weight ? at::zeros_like(weight) : at::empty({0}, weight.options());
  at::Tensor grad_weight_acc;
  if (need_weight) grad_weight_acc = weight.scalar_type() == at::kFloat ? grad_weight : at::zeros(weight.sizes(), fp32);
  if (num_rows == 0 || (!need_hidden && !need_weight)) return {grad_hidden, grad_weight};

  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const int64_t num_tiles = ceil_div(vocab, kVocabTile);
  const int64_t num_threads = at::get_num_threads();
  const int64_t* target_ptr = targets.data_ptr<int64_t>();

  for (int64_t row0 = 0; row0 < num_rows; row0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, num_rows - row0);
    const at::Tensor block = hidden.narrow(0, row0, rows).to(at::kFloat);
    const at::Tensor block_lse = lse.narrow(0, row0, rows).unsqueeze(1);
    const at::Tensor block_grad = grad_logprobs.narrow(0, row0, rows);
    const float* grad_ptr = block_grad.data_ptr<float>();
    const at::Tensor neg_grad = block_grad.neg().unsqueeze(1);
    at::Tensor neg_grad_entropy, block_mean;
    if (has_entropy_grad) {
      neg_grad_entropy = grad_entropy.narrow(0, row0, rows).neg().unsqueeze(1);
      block_mean = mean_logit.narrow(0, row0, rows).unsqueeze(1);
    }
    at::Tensor hidden_partials = need_hidden ? at::zeros({num_threads, rows, width}, fp32) : at::Tensor();

    at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
      at::Tensor logits_buf = at::empty({rows * kVocabTile}, fp32);
      at::Tensor grad_buf = at::empty({rows * kVocabTile}, fp32);
      at::Tensor weight_buf = at::empty({kVocabTile * width}, fp32);
      at::Tensor partial = need_hidden ? hidden_partials[at::get_thread_num()] : at::Tensor();
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t v0 = tile * kVocabTile;
        const int64_t count = std::min(kVocabTile, vocab - v0);
        at::Tensor logits = as_matrix(logits_buf, rows, count);
        at::Tensor grad_logits = as_matrix(grad_buf, rows, count);
        const at::Tensor weight_tile = weight_tile_fp32(weight, v0, count, weight_buf);
        at::mm_out(logits, block, weight_tile.t());
        logits.mul_(inv_temperature);
        at::sub_out(grad_logits, logits, block_lse);
        grad_logits.exp_();  // softmax probabilities p
        if (has_entropy_grad) {
          logits.sub_(block_mean).mul_(neg_grad_entropy).add_(neg_grad);
          grad_logits.mul_(logits);
        } else {
          grad_logits.mul_(neg_grad);
        }
        float* grad_logit_ptr = grad_logits.data_ptr<float>();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t local = target_ptr[row0 + r] - v0;
          if (local >= 0 && local < count) grad_logit_ptr[r * count + local] += grad_ptr[r];
        }
        if (need_hidden) partial.addmm_(grad_logits, weight_tile, 1.0, inv_temperature);
        if (need_weight) {
          at::Tensor weight_rows = grad_weight_acc.narrow(0, v0, count);
          weight_rows.addmm_(grad_logits.t(), block, 1.0, inv_temperature);
        }
      }
    });
    if (need_hidden) grad_hidden.narrow(0, row0, rows).copy_(hidden_partials.sum(0));
  }
  if (need_weight && !grad_weight_acc.is_same(grad_weight)) grad_weight.copy_(grad_weight_acc);
  return {grad_hidden, grad_weight};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anytime_kernels, m) {
  m.def("fused_logprobs_forward(Tensor hidden, Tensor weight, Tensor targets, float temperature, "
        "bool compute_entropy) -> Tensor[]");
  m.def("fused_logprobs_backward(Tensor hidden, Tensor weight, Tensor targets, Tensor lse, Tensor? mean_logit, "
        "Tensor grad_logprobs, Tensor? grad_entropy, float temperature, bool need_hidden, bool need_weight) "
        "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(anytime_kernels, CPU, m) {
  m.impl("fused_logprobs_forward", &fused_logprobs_forward_cpu);
  m.impl("fused_logprobs_backward", &fused_logprobs_backward_cpu);
}

}  // namespace anytime_kernels
