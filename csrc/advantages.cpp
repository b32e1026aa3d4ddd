// BRPO advantages over segmented budget prefixes (rules: ARCHITECTURE.md, "The method in one page").
//
// brpo_advantages: one work item per group of G traces computes returns R_s, the baselines V1_s
// and V2_s, the thinking advantages and the summary baselines, in double precision.
// token_advantages: scatters them over the packed response-tree layout (anytime_kernels/tree.py).
// It writes by ranges, reading almost nothing per token, from the layout's invariants: the trunk
// of a row is prompt then thinking z, whose thinking tokens of slot s are exactly
// [P + c_{s-1}, P + c_s); after the trunk come the branches in order, so branch_start is
// non-decreasing there and constant within a branch, and within a branch token_kind goes
// INSERTED then SUMMARY. Two binary searches per branch find its end and its first summary token.
//
// The Python wrapper (anytime_kernels/advantages.py) validates every input before calling here;
// the checks below guard the op when it is called directly.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "constants.h"
#include "memory.h"

namespace anytime_kernels {
namespace {

// Scores entries (G * S * A per group) per parallel work item; smaller inputs run inline, where a
// thread wake-up would cost more than the work.
constexpr int64_t kGrainScores = 32768;
// The scatter runs on one thread below 2 * kGrainTokens packed tokens.
constexpr int64_t kGrainTokens = 65536;


enum class Baseline { kBrpo, kV1Only, kV2Only, kNone };

Baseline parse_baseline(const std::string& name) {
  if (name == "brpo") return Baseline::kBrpo;
  if (name == "v1only") return Baseline::kV1Only;
  if (name == "v2only") return Baseline::kV2Only;
  TORCH_CHECK_VALUE(name == "none", "variance_reduction must be brpo, v1only, v2only or none, got '", name, "'");
  return Baseline::kNone;
}

bool parse_grpo(const std::string& name) {
  TORCH_CHECK_VALUE(name == "brpo" || name == "grpo", "summary_method must be brpo or grpo, got '", name, "'");
  return name == "grpo";
}

std::tuple<at::Tensor, at::Tensor> brpo_advantages_cpu(const at::Tensor& scores_in, const at::Tensor& cut_lens_in,
                                                       int64_t group_size, const at::Tensor& budget_probs_in,
                                                       c10::string_view variance_reduction,
                                                       c10::string_view summary_method) {
  TORCH_CHECK_VALUE(scores_in.dim() == 3, "scores must be [N, S, A], got shape ", scores_in.sizes());
  const int64_t num_traces = scores_in.size(0), num_slots = scores_in.size(1), num_summaries = scores_in.size(2);
  TORCH_CHECK_VALUE(cut_lens_in.dim() == 2 && cut_lens_in.size(0) == num_traces && cut_lens_in.size(1) == num_slots,
                    "cut_lens must be [N=", num_traces, ", S=", num_slots, "], got shape ", cut_lens_in.sizes());
  TORCH_CHECK_VALUE(budget_probs_in.dim() == 1 && budget_probs_in.size(0) == num_slots,
                    "budget_probs must be [S=", num_slots, "], got shape ", budget_probs_in.sizes());
  TORCH_CHECK_VALUE(group_size >= 1 && num_traces % group_size == 0, "group_size must be >= 1 and divide N=",
                    num_traces, ", got ", group_size);
  const Baseline baseline_kind = parse_baseline(std::string(variance_reduction));
  const bool grpo = parse_grpo(std::string(summary_method));

  const at::Tensor scores = scores_in.to(at::kDouble).contiguous();
  const at::Tensor cut_lens = cut_lens_in.to(at::kLong).contiguous();
  at::Tensor probs = budget_probs_in.to(at::kDouble).contiguous();
  const double prob_sum = probs.sum().item<double>();
  TORCH_CHECK_VALUE(prob_sum > 0, "budget_probs must sum to a positive number, got ", prob_sum);

  at::Tensor thinking_adv = at::empty({num_traces, num_slots}, at::kFloat);
  at::Tensor summary_adv = at::empty({num_traces, num_slots, num_summaries}, at::kFloat);
  const double* r = scores.data_ptr<double>();
  const int64_t* cuts = cut_lens.data_ptr<int64_t>();
  const double* p_raw = probs.data_ptr<double>();
  float* out_thinking = thinking_adv.data_ptr<float>();
  float* out_summary = summary_adv.data_ptr<float>();

  const int64_t S = num_slots, A = num_summaries, G = group_size;
  std::vector<double> p(S), tail_prob(S);
  for (int64_t s = 0; s < S; ++s) p[s] = p_raw[s] / prob_sum;
  double tail = 0;
  for (int64_t s = S - 1; s >= 0; --s) tail_prob[s] = (tail += p[s]);

  const int64_t grain_groups = std::max<int64_t>(1, kGrainScores / (G * S * A));
  at::parallel_for(0, num_traces / G, grain_groups, [&](int64_t begin, int64_t end) {
    std::vector<double> rbar(G * S), returns(G * S), v2(S), first_mean(S);
    for (int64_t group = begin; group < end; ++group) {
      const int64_t n0 = group * G;
      std::fill(v2.begin(), v2.end(), 0.0);
      std::fill(first_mean.begin(), first_mean.end(), 0.0);
      for (int64_t g = 0; g < G; ++g) {
        const double* row = r + (n0 + g) * S * A;
        double running = 0;  // R_s = sum_{k>=s} p_k rbar_k, accumulated from the last slot
        for (int64_t s = S - 1; s >= 0; --s) {
          double total = 0;
          for (int64_t a = 0; a < A; ++a) total += row[s * A + a];
          rbar[g * S + s] = total / A;
          running += p[s] * rbar[g * S + s];
          returns[g * S + s] = running;
          v2[s] += running / G;
          first_mean[s] += row[s * A] / G;
        }
      }
      if (G == 1) std::fill(v2.begin(), v2.end(), 0.0);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t n = n0 + g;
        // V1_s = (sum_{k<s} 2^k rbar_k / sum_{k<s} 2^k) * sum_{k>=s} p_k; the 2^(k-s) scaling
        // keeps the weights bounded for any S.
        double earlier = 0, earlier_weight = 0;
        for (int64_t s = 0; s < S; ++s) {
          const double v1 = s == 0 ? 0.0 : earlier / earlier_weight * tail_prob[s];
          double baseline = 0;
          switch (baseline_kind) {
            case Baseline::kBrpo: baseline = (s * v1 + (S - s) * v2[s]) / S; break;
            case Baseline::kV1Only: baseline = v1; break;
            case Baseline::kV2Only: baseline = v2[s]; break;
            case Baseline::kNone: break;
          }
          out_thinking[n * S + s] = static_cast<float>(returns[g * S + s] - baseline);
          earlier = 0.5 * (earlier + rbar[g * S + s]);
          earlier_weight = 0.5 * (earlier_weight + 1.0);
        }
        const int64_t* trace_cuts = cuts + n * S;
        const double* row = r + n * S * A;
        for (int64_t s = 0; s < S; ++s) {
          double summary_baseline;
          if (A == 1) {
            summary_baseline = first_mean[s];
          } else {
            double shared = 0;
            int64_t count = 0;
            for (int64_t k = 0; k < S; ++k) {
              if (trace_cuts[k] == trace_cuts[s]) {
                shared += rbar[g * S + k];
                ++count;
              }
            }
            summary_baseline = shared / count;
          }
          for (int64_t a = 0; a < A; ++a) {
            const bool kept = !grpo || (s == S - 1 && a == A - 1);
            out_summary[(n * S + s) * A + a] = kept ? static_cast<float>(row[s * A + a] - summary_baseline) : 0.0f;
          }
        }
      }
    }
  });
  return {thinking_adv, summary_adv};
}

at::Tensor token_advantages_cpu(const at::Tensor& cu_seqlens_in, const at::Tensor& prompt_lens_in,
                                const at::Tensor& thinking_lens_in, const at::Tensor& cut_lens_in,
                                const at::Tensor& token_kind_in, const at::Tensor& slot_in,
                                const at::Tensor& summary_index_in, const at::Tensor& branch_start_in,
                                const at::Tensor& thinking_adv_in,
                                const at::Tensor& summary_adv_in) {
  TORCH_CHECK_VALUE(thinking_adv_in.dim() == 2 && summary_adv_in.dim() == 3, "thinking_adv must be [N, S] and ",
                    "summary_adv [N, S, A], got ", thinking_adv_in.sizes(), " and ", summary_adv_in.sizes());
  const int64_t num_traces = thinking_adv_in.size(0), S = thinking_adv_in.size(1), A = summary_adv_in.size(2);
  TORCH_CHECK_VALUE(cut_lens_in.dim() == 2 && cut_lens_in.size(0) == num_traces && cut_lens_in.size(1) == S,
                    "cut_lens must be [N=", num_traces, ", S=", S, "], got ", cut_lens_in.sizes());
  TORCH_CHECK_VALUE(cu_seqlens_in.numel() == num_traces + 1, "cu_seqlens must have N + 1 = ", num_traces + 1,
                    " entries, got ", cu_seqlens_in.numel());
  const int64_t total = token_kind_in.numel();
  TORCH_CHECK_VALUE(slot_in.numel() == total && summary_index_in.numel() == total && branch_start_in.numel() == total,
                    "token_kind, slot, summary_index and branch_start must have one entry per token");

  const at::Tensor cu_seqlens = cu_seqlens_in.to(at::kLong).contiguous();
  const at::Tensor prompt_lens = prompt_lens_in.to(at::kLong).contiguous();
  const at::Tensor thinking_lens = thinking_lens_in.to(at::kLong).contiguous();
  const at::Tensor cut_lens = cut_lens_in.to(at::kLong).contiguous();
  const at::Tensor token_kind = token_kind_in.to(at::kChar).contiguous();
  const at::Tensor slot = slot_in.to(at::kInt).contiguous();
  const at::Tensor summary_index = summary_index_in.to(at::kInt).contiguous();
  const at::Tensor branch_start = branch_start_in.to(at::kInt).contiguous();
  const at::Tensor thinking_adv = thinking_adv_in.to(at::kFloat).contiguous();
  const at::Tensor summary_adv = summary_adv_in.to(at::kFloat).contiguous();
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(cu[num_traces] == total, "cu_seqlens ends at ", cu[num_traces], " but the layout has ", total,
                    " tokens");

  at::Tensor out = at::empty({total}, at::kFloat);
  float* adv = out.data_ptr<float>();
  advise_huge_pages(adv, total * static_cast<int64_t>(sizeof(float)));
  const int64_t* prompt = prompt_lens.data_ptr<int64_t>();
  const int64_t* thinking = thinking_lens.data_ptr<int64_t>();
  const int64_t* cuts_all = cut_lens.data_ptr<int64_t>();
  const int8_t* kind = token_kind.data_ptr<int8_t>();
  const int32_t* slots = slot.data_ptr<int32_t>();
  const int32_t* summaries = summary_index.data_ptr<int32_t>();
  const int32_t* branches = branch_start.data_ptr<int32_t>();
  const float* thinking_values = thinking_adv.data_ptr<float>();
  const float* summary_values = summary_adv.data_ptr<float>();

  // Serial checks of the row structure the fill relies on (the layout guarantees it; a direct call
  // with inconsistent tensors must not write outside the output).
  for (int64_t n = 0; n < num_traces; ++n) {
    const int64_t* cuts = cuts_all + n * S;
    TORCH_CHECK_VALUE(prompt[n] >= 0 && thinking[n] >= 0 && cu[n] + prompt[n] + thinking[n] <= cu[n + 1], "trace ", n,
                      ": prompt (", prompt[n], ") and thinking (", thinking[n], ") do not fit its row of ",
                      cu[n + 1] - cu[n], " tokens");
    for (int64_t s = 0; s < S; ++s) {
      TORCH_CHECK_VALUE(cuts[s] >= (s ? cuts[s - 1] : 0) && cuts[s] <= thinking[n], "trace ", n, ": cut_lens[", s,
                        "] = ", cuts[s], " must be non-decreasing and within the thinking length ", thinking[n]);
    }
  }

  const auto fill_row = [&](int64_t n) {
    const int64_t row_start = cu[n], row_end = cu[n + 1];
    const int64_t trunk_start = row_start + prompt[n], trunk_end = trunk_start + thinking[n];
    const int64_t* cuts = cuts_all + n * S;
    std::fill(adv + row_start, adv + trunk_start, 0.0f);
    int64_t segment_start = trunk_start;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t segment_end = trunk_start + cuts[s];
      if (segment_end > segment_start) std::fill(adv + segment_start, adv + segment_end, thinking_values[n * S + s]);
      segment_start = std::max(segment_start, segment_end);
    }
    std::fill(adv + segment_start, adv + trunk_end, 0.0f);
    const float* trace_summaries = summary_values + n * S * A;
    for (int64_t t = trunk_end; t < row_end;) {
      // Galloping search for the branch end: probes stay near t (branches are ~100 tokens), where a
      // binary search over the rest of the row would miss the cache at every step.
      const int32_t branch = branches[t];
      int64_t inside = t, step = 1;
      while (t + step < row_end && branches[t + step] == branch) {
        inside = t + step;
        step *= 2;
      }
      const int64_t probe_end = std::min(t + step, row_end);
      const int64_t branch_end = std::upper_bound(branches + inside, branches + probe_end, branch) - branches;
      const int64_t summary_start = std::lower_bound(kind + t, kind + branch_end, kSummary) - kind;
      std::fill(adv + t, adv + summary_start, 0.0f);
      if (summary_start < branch_end) {
        const float value = trace_summaries[slots[summary_start] * A + summaries[summary_start]];
        std::fill(adv + summary_start, adv + branch_end, value);
      }
      t = branch_end;
    }
  };
  // Rows are handed out dynamically: the fill is memory-bound, and on a shared machine a static
  // split would wait for a descheduled thread's half of the rows.
#ifdef _OPENMP
  const int threads = total >= 2 * kGrainTokens ? at::get_num_threads() : 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t n = 0; n < num_traces; ++n) fill_row(n);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anytime_kernels, m) {
  m.def(
      "brpo_advantages(Tensor scores, Tensor cut_lens, int group_size, Tensor budget_probs, "
      "str variance_reduction, str summary_method) -> (Tensor, Tensor)");
  m.def(
      "token_advantages(Tensor cu_seqlens, Tensor prompt_lens, Tensor thinking_lens, Tensor cut_lens, "
      "Tensor token_kind, Tensor slot, Tensor summary_index, Tensor branch_start, Tensor thinking_adv, "
      "Tensor summary_adv) -> Tensor");
}

TORCH_LIBRARY_IMPL(anytime_kernels, CPU, m) {
  m.impl("brpo_advantages", &brpo_advantages_cpu);
  m.impl("token_advantages", &token_advantages_cpu);
}

}  // namespace anytime_kernels
