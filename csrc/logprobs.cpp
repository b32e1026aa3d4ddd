// Fused per-token log-probs on CPU (see anytime_kernels/logprobs.py for the maths and the API).
//
// logits = hidden @ weight.T / temperature is never held whole: rows are taken in blocks of
// kRowBlock and the vocabulary in tiles of kVocabTile, so the working set is a few
// [kRowBlock, kVocabTile] fp32 tiles per thread, whatever M and V are. Threads split the vocabulary
// tiles of one row block (each thread runs its GEMMs single-threaded; at this size they run near
// the core's peak, faster than one large multi-threaded GEMM), which keeps small M fully parallel
// and gives every thread disjoint rows of grad_weight. Tiles are claimed one at a time from a shared
// counter, not split into fixed shares, so on a shared machine a descheduled thread holds up one
// tile rather than its whole share of the row block.
//
// Forward: every tile yields per-row (max, sum of exp, sum of exp * logit) of its slice, merged
// online into the thread's running statistics; a final merge over threads gives lse and the entropy
// lse - E[z]. The thread whose tile holds a row's target writes that row's target logit (each
// target lies in exactly one tile: no race). The 1/temperature scale rides on the GEMM (alpha).
//
// Backward recomputes each tile: with p = exp(z - lse),
//   dL/dz = g_lp * (onehot(target) - p) - g_ent * p * (z - mean_z),    mean_z = lse - entropy,
// formed in place in the logits tile, then grad_hidden += dz @ W_tile / T (per-thread partials,
// summed after the block) and grad_weight[tile] += dz.T @ h_block / T. Accumulation is fp32
// whatever the input dtype; grad_hidden comes back in fp32 (the wrapper scatter-adds it over
// repeated rows before casting).
//
// The Python wrapper validates inputs, gathers hidden[rows], and zeroes g_lp/g_ent on ignored
// targets, so these ops see contiguous [M, H] rows and in-range or kIgnoreIndex targets.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstdint>
#include <optional>
#include <vector>

#include "constants.h"

namespace anytime_kernels {
namespace {

constexpr int64_t kRowBlock = 512;
constexpr int64_t kVocabTile = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Workers for `num_items` work items: one per intra-op thread, never more than the items.
int64_t num_workers(int64_t num_items) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items));
}

// Runs body(item, worker) for every item in [0, num_items) on `workers` workers. Items are claimed one
// at a time from a shared counter rather than split into fixed shares up front: on a shared or
// oversubscribed machine a worker the OS deschedules then delays only the item it holds, not a
// whole share of the work. `worker` in [0, workers) names the worker, for per-worker buffers.
template <typename Body>
void parallel_claim(int64_t num_items, int64_t workers, const Body& body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t item = next.fetch_add(1); item < num_items; item = next.fetch_add(1)) body(item, worker);
    }
  });
}

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
at::Tensor as_matrix(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// out = block @ tile.T * inv_temperature in one GEMM (beta = 0: out's old contents are not read).
void tile_logits(at::Tensor& out, const at::Tensor& block, const at::Tensor& weight_tile, float inv_temperature) {
  at::addmm_out(out, out, block, weight_tile.t(), 0.0, inv_temperature);
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
  const int64_t workers = num_workers(num_tiles);
  const int64_t block_rows = std::min(kRowBlock, num_rows);
  const int64_t* target_ptr = targets.data_ptr<int64_t>();
  float* logprob_ptr = logprobs.data_ptr<float>();
  float* entropy_ptr = compute_entropy ? entropy.data_ptr<float>() : nullptr;
  float* lse_ptr = lse.data_ptr<float>();

  // Per worker: the logits and exp tiles, a converted weight tile, the tile's row maxima, and the
  // running (max, sum of exp, sum of exp * logit) of every row of the block over its tiles so far.
  const int64_t tile_elems = block_rows * kVocabTile;
  const at::Tensor logits_bufs = at::empty({workers, tile_elems}, fp32);
  const at::Tensor exp_bufs = at::empty({workers, tile_elems}, fp32);
  const at::Tensor weight_bufs = at::empty({workers, kVocabTile * width}, fp32);
  const at::Tensor stat_bufs = at::empty({workers, 3, block_rows}, fp32);  // tile max, sum, weighted
  at::Tensor run_max = at::empty({workers, block_rows}, fp32);
  at::Tensor run_sum = at::empty({workers, block_rows}, fp32);
  at::Tensor run_weighted = at::empty({workers, block_rows}, fp32);
  at::Tensor target_logit = at::empty({block_rows}, fp32);
  float* target_logit_ptr = target_logit.data_ptr<float>();

  for (int64_t row0 = 0; row0 < num_rows; row0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, num_rows - row0);
    const at::Tensor block = hidden.narrow(0, row0, rows).to(at::kFloat);
    run_max.fill_(-std::numeric_limits<float>::infinity());
    run_sum.zero_();
    run_weighted.zero_();
    target_logit.zero_();

    parallel_claim(num_tiles, workers, [&](int64_t tile, int64_t worker) {
      const int64_t v0 = tile * kVocabTile;
      const int64_t count = std::min(kVocabTile, vocab - v0);
      at::Tensor scratch = weight_bufs[worker];
      at::Tensor logits = as_matrix(logits_bufs[worker], rows, count);
      at::Tensor exps = as_matrix(exp_bufs[worker], rows, count);
      at::Tensor stats = stat_bufs[worker];
      at::Tensor tile_max = stats[0].narrow(0, 0, rows);
      at::Tensor tile_sum = stats[1].narrow(0, 0, rows);
      at::Tensor tile_weighted = stats[2].narrow(0, 0, rows);
      tile_logits(logits, block, weight_tile_fp32(weight, v0, count, scratch), inv_temperature);
      at::amax_out(tile_max, logits, {1});
      at::sub_out(exps, logits, tile_max.unsqueeze(1));
      exps.exp_();
      at::sum_out(tile_sum, exps, {1});
      if (compute_entropy) {
        exps.mul_(logits);
        at::sum_out(tile_weighted, exps, {1});
      }
      // Merge the tile's statistics into the worker's running ones (online log-sum-exp).
      const float* tmax = tile_max.data_ptr<float>();
      const float* tsum = tile_sum.data_ptr<float>();
      const float* tweighted = tile_weighted.data_ptr<float>();
      float* rmax = run_max[worker].data_ptr<float>();
      float* rsum = run_sum[worker].data_ptr<float>();
      float* rweighted = run_weighted[worker].data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
        const float merged = std::max(rmax[r], tmax[r]);
        const float old_scale = std::exp(rmax[r] - merged), tile_scale = std::exp(tmax[r] - merged);
        rsum[r] = rsum[r] * old_scale + tsum[r] * tile_scale;
        if (compute_entropy) rweighted[r] = rweighted[r] * old_scale + tweighted[r] * tile_scale;
        rmax[r] = merged;
      }
      // Each target lies in exactly one tile: one writer per row.
      const float* logit_ptr = logits.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t local = target_ptr[row0 + r] - v0;
        if (local >= 0 && local < count) target_logit_ptr[r] = logit_ptr[r * count + local];
      }
    });

    // Merge the workers' statistics; a worker that saw no tile has max -inf and sums 0.
    const float* rmax = run_max.data_ptr<float>();
    const float* rsum = run_sum.data_ptr<float>();
    const float* rweighted = run_weighted.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      float row_max = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < workers; ++s) row_max = std::max(row_max, rmax[s * block_rows + r]);
      double sum = 0.0, weighted = 0.0;
      for (int64_t s = 0; s < workers; ++s) {
        const int64_t idx = s * block_rows + r;
        if (rsum[idx] == 0.0f) continue;
        const double scale = std::exp(static_cast<double>(rmax[idx]) - row_max);
        sum += rsum[idx] * scale;
        weighted += rweighted[idx] * scale;
      }
      const float row_lse = row_max + static_cast<float>(std::log(sum));
      const bool valid = target_ptr[row0 + r] != kIgnoreIndex;
      lse_ptr[row0 + r] = row_lse;
      logprob_ptr[row0 + r] = valid ? target_logit_ptr[r] - row_lse : 0.0f;
      if (compute_entropy) entropy_ptr[row0 + r] = valid ? row_lse - static_cast<float>(weighted / sum) : 0.0f;
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
  const int64_t workers = num_workers(num_tiles);
  const int64_t block_rows = std::min(kRowBlock, num_rows);
  const int64_t* target_ptr = targets.data_ptr<int64_t>();

  // Per worker: the recomputed logits tile (turned into dL/dz in place), the probabilities (only
  // with an entropy gradient), a converted weight tile, and its share of the block's grad_hidden.
  const int64_t tile_elems = block_rows * kVocabTile;
  const at::Tensor logits_bufs = at::empty({workers, tile_elems}, fp32);
  const at::Tensor prob_bufs = has_entropy_grad ? at::empty({workers, tile_elems}, fp32) : at::Tensor();
  const at::Tensor weight_bufs = at::empty({workers, kVocabTile * width}, fp32);
  at::Tensor hidden_partials = need_hidden ? at::empty({workers, block_rows, width}, fp32) : at::Tensor();

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
    if (need_hidden) hidden_partials.zero_();

    parallel_claim(num_tiles, workers, [&](int64_t tile, int64_t worker) {
      const int64_t v0 = tile * kVocabTile;
      const int64_t count = std::min(kVocabTile, vocab - v0);
      at::Tensor scratch = weight_bufs[worker];
      at::Tensor grad_logits = as_matrix(logits_bufs[worker], rows, count);
      const at::Tensor weight_tile = weight_tile_fp32(weight, v0, count, scratch);
      tile_logits(grad_logits, block, weight_tile, inv_temperature);
      // dL/dz = -p * (g_lp + g_ent * (z - mean_z)), plus g_lp at the target.
      if (has_entropy_grad) {
        at::Tensor probs = as_matrix(prob_bufs[worker], rows, count);
        at::sub_out(probs, grad_logits, block_lse);
        probs.exp_();
        grad_logits.sub_(block_mean).mul_(neg_grad_entropy).add_(neg_grad).mul_(probs);
      } else {
        grad_logits.sub_(block_lse).exp_().mul_(neg_grad);
      }
      float* grad_logit_ptr = grad_logits.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t local = target_ptr[row0 + r] - v0;
        if (local >= 0 && local < count) grad_logit_ptr[r * count + local] += grad_ptr[r];
      }
      if (need_hidden) {
        at::Tensor partial = hidden_partials[worker].narrow(0, 0, rows);
        partial.addmm_(grad_logits, weight_tile, 1.0, inv_temperature);
      }
      if (need_weight) {
        at::Tensor weight_rows = grad_weight_acc.narrow(0, v0, count);
        weight_rows.addmm_(grad_logits.t(), block, 1.0, inv_temperature);
      }
    });
    if (need_hidden) {
      at::Tensor out = grad_hidden.narrow(0, row0, rows);
      at::sum_out(out, hidden_partials.narrow(1, 0, rows), {0});
    }
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
