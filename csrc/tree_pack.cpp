// Packing of rollouts into the response-tree layout (see ARCHITECTURE.md, "Packed response tree").
//
// One row per trace: prompt, thinking, then every summary branch (inserted delimiter + summary).
// Branch tokens take position ids P + c + i and attend to the prompt, z[:c] and their own branch.
// The Python wrapper (anytime_kernels/tree.py) flattens the nested token lists into CSR form
// (`tokens` + `segment_offsets`) so this op sees only flat tensors. Per trace n the segments are
// laid out as: prompt, thinking, inserted[0..D_n), summary[s][a] for s < S, a < A (s-major).
//
// Validation runs serially before the parallel fill, so errors name the first bad trace and no
// exception is ever thrown inside an OpenMP region.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "constants.h"
#include "memory.h"

#include <cstdint>
#include <vector>

namespace anytime_kernels {
namespace {

struct TraceView {
  int64_t segment_base;  // index of this trace's prompt segment
  int64_t num_inserted;  // D_n, distinct cuts
};

// Index of the distinct cut of every slot: distinct cuts are the distinct values of a
// non-decreasing cut vector, in order.
inline void distinct_cut_index(const int64_t* cuts, int64_t num_slots, int64_t* out) {
  int64_t d = -1;
  for (int64_t s = 0; s < num_slots; ++s) {
    if (s == 0 || cuts[s] != cuts[s - 1]) ++d;
    out[s] = d;
  }
}

// Slot of thinking token j: first s with j < c_s; -1 beyond the last cut (never trained).
inline int64_t thinking_slot(const int64_t* cuts, int64_t num_slots, int64_t j) {
  for (int64_t s = 0; s < num_slots; ++s) {
    if (j < cuts[s]) return s;
  }
  return -1;
}

std::vector<at::Tensor> pack_response_trees_cpu(
    const at::Tensor& tokens_in,
    const at::Tensor& segment_offsets_in,
    const at::Tensor& cut_lens_in,
    const at::Tensor& num_inserted_in,
    int64_t num_summaries) {
  TORCH_CHECK_VALUE(tokens_in.dim() == 1, "tokens must be 1-D, got shape ", tokens_in.sizes());
  TORCH_CHECK_VALUE(cut_lens_in.dim() == 2, "cut_lens must be [N, S], got shape ", cut_lens_in.sizes());
  TORCH_CHECK_VALUE(num_summaries >= 1, "num_summaries (A) must be >= 1, got ", num_summaries);
  TORCH_CHECK_VALUE(segment_offsets_in.dim() == 1 && segment_offsets_in.numel() >= 1,
                    "segment_offsets must be 1-D with at least one entry, got shape ", segment_offsets_in.sizes());
  const at::Tensor tokens = tokens_in.to(at::kLong).contiguous();
  const at::Tensor segment_offsets = segment_offsets_in.to(at::kLong).contiguous();
  const at::Tensor cut_lens = cut_lens_in.to(at::kLong).contiguous();
  const at::Tensor num_inserted = num_inserted_in.to(at::kLong).contiguous();

  const int64_t num_traces = cut_lens.size(0);
  const int64_t num_slots = cut_lens.size(1);
  TORCH_CHECK_VALUE(num_slots >= 1, "cut_lens must have at least one budget slot, got shape ", cut_lens.sizes());
  TORCH_CHECK_VALUE(num_inserted.numel() == num_traces, "num_inserted must have ", num_traces,
                    " entries (one per trace), got ", num_inserted.numel());

  const int64_t* tokens_ptr = tokens.data_ptr<int64_t>();
  const int64_t* segment_ptr = segment_offsets.data_ptr<int64_t>();
  const int64_t* cuts_all = cut_lens.data_ptr<int64_t>();
  const int64_t* ins = num_inserted.data_ptr<int64_t>();
  const int64_t num_segments = segment_offsets.numel() - 1;

  // ---- serial validation and row lengths ----
  std::vector<TraceView> views(num_traces);
  std::vector<int64_t> row_len(num_traces);
  std::vector<int64_t> distinct(num_slots);
  int64_t segment_base = 0;
  for (int64_t n = 0; n < num_traces; ++n) {
    const int64_t* cuts = cuts_all + n * num_slots;
    views[n] = {segment_base, ins[n]};
    const int64_t trace_segments = 2 + ins[n] + num_slots * num_summaries;
    TORCH_CHECK_VALUE(segment_base + trace_segments <= num_segments, "trace ", n,
                      ": segment_offsets has too few segments (", num_segments, ") for the traces");
    const int64_t prompt_len = segment_ptr[segment_base + 1] - segment_ptr[segment_base];
    const int64_t thinking_len = segment_ptr[segment_base + 2] - segment_ptr[segment_base + 1];
    for (int64_t s = 0; s < num_slots; ++s) {
      TORCH_CHECK_VALUE(cuts[s] >= 0, "trace ", n, ": cut_lens[", s, "] = ", cuts[s], " is negative");
      TORCH_CHECK_VALUE(cuts[s] <= thinking_len, "trace ", n, ": cut_lens[", s, "] = ", cuts[s],
                        " is beyond the thinking length ", thinking_len);
      TORCH_CHECK_VALUE(s == 0 || cuts[s] >= cuts[s - 1], "trace ", n, ": cut_lens decrease at slot ", s,
                        " (", cuts[s - 1], " then ", cuts[s], ")");
    }
    distinct_cut_index(cuts, num_slots, distinct.data());
    TORCH_CHECK_VALUE(ins[n] == distinct[num_slots - 1] + 1, "trace ", n, ": got ", ins[n],
                      " inserted delimiters, expected one per distinct cut (", distinct[num_slots - 1] + 1, ")");
    int64_t len = prompt_len + thinking_len;
    for (int64_t s = 0; s < num_slots; ++s) {
      const int64_t inserted_len = segment_ptr[segment_base + 3 + distinct[s]] - segment_ptr[segment_base + 2 + distinct[s]];
      for (int64_t a = 0; a < num_summaries; ++a) {
        const int64_t g = segment_base + 2 + ins[n] + s * num_summaries + a;
        len += inserted_len + (segment_ptr[g + 1] - segment_ptr[g]);
      }
    }
    row_len[n] = len;
    segment_base += trace_segments;
  }
  TORCH_CHECK_VALUE(segment_base == num_segments, "segment_offsets describes ", num_segments,
                    " segments but the traces use ", segment_base);
  TORCH_CHECK_VALUE(tokens.numel() == (num_segments > 0 ? segment_ptr[num_segments] : 0), "tokens has ",
                    tokens.numel(), " entries but segment_offsets ends at ", segment_ptr[num_segments]);
  if (tokens.numel() > 0) {
    const int64_t min_id = tokens.min().item<int64_t>();
    if (min_id < 0) {
      const int64_t* first = tokens_ptr;
      while (*first >= 0) ++first;
      const int64_t flat = first - tokens_ptr;
      int64_t bad_trace = 0;
      for (int64_t n = 0; n < num_traces; ++n) {
        if (segment_ptr[views[n].segment_base] <= flat) bad_trace = n;
      }
      TORCH_CHECK_VALUE(false, "trace ", bad_trace, ": token id ", *first, " is negative");
    }
  }

  auto cu_seqlens = at::empty({num_traces + 1}, at::kInt);
  int32_t* row_offsets = cu_seqlens.data_ptr<int32_t>();
  int64_t total = 0;
  row_offsets[0] = 0;
  for (int64_t n = 0; n < num_traces; ++n) {
    total += row_len[n];
    TORCH_CHECK_VALUE(total < INT32_MAX, "packed batch exceeds 2^31 tokens");
    row_offsets[n + 1] = static_cast<int32_t>(total);
  }

  at::Tensor input_ids = empty_huge({total}, at::kLong);
  at::Tensor position_ids = empty_huge({total}, at::kLong);
  at::Tensor labels = empty_huge({total}, at::kLong);
  at::Tensor seq_ids = empty_huge({total}, at::kInt);
  at::Tensor token_kind = empty_huge({total}, at::kChar);
  at::Tensor slot = empty_huge({total}, at::kInt);
  at::Tensor summary_index = empty_huge({total}, at::kInt);
  at::Tensor prefix_end = empty_huge({total}, at::kInt);
  at::Tensor branch_start = empty_huge({total}, at::kInt);

  int64_t* out_ids = input_ids.data_ptr<int64_t>();
  int64_t* out_positions = position_ids.data_ptr<int64_t>();
  int64_t* out_labels = labels.data_ptr<int64_t>();
  int32_t* out_seq = seq_ids.data_ptr<int32_t>();
  int8_t* out_kind = token_kind.data_ptr<int8_t>();
  int32_t* out_slot = slot.data_ptr<int32_t>();
  int32_t* out_summary_index = summary_index.data_ptr<int32_t>();
  int32_t* out_prefix_end = prefix_end.data_ptr<int32_t>();
  int32_t* out_branch_start = branch_start.data_ptr<int32_t>();

  // ---- parallel fill, one trace per work item ----
  at::parallel_for(0, num_traces, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> distinct_local(num_slots);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t* cuts = cuts_all + n * num_slots;
      distinct_cut_index(cuts, num_slots, distinct_local.data());
      const int64_t prompt_segment = views[n].segment_base;
      const int64_t* prompt = tokens_ptr + segment_ptr[prompt_segment];
      const int64_t prompt_len = segment_ptr[prompt_segment + 1] - segment_ptr[prompt_segment];
      const int64_t* thinking = tokens_ptr + segment_ptr[prompt_segment + 1];
      const int64_t thinking_len = segment_ptr[prompt_segment + 2] - segment_ptr[prompt_segment + 1];
      const int32_t row_start = row_offsets[n];
      int64_t t = row_start;
      // Trunk: prompt then thinking, plain causal attention within the row.
      const int64_t first_thinking_slot = thinking_len > 0 ? thinking_slot(cuts, num_slots, 0) : -1;
      for (int64_t j = 0; j < prompt_len; ++j, ++t) {
        out_ids[t] = prompt[j];
        out_positions[t] = j;
        out_labels[t] = (j == prompt_len - 1 && first_thinking_slot >= 0) ? thinking[0] : kIgnoreIndex;
        out_seq[t] = static_cast<int32_t>(n);
        out_kind[t] = kPrompt;
        out_slot[t] = -1;
        out_summary_index[t] = -1;
        out_prefix_end[t] = row_start;
        out_branch_start[t] = row_start;
      }
      int64_t segment_slot = 0;  // segment slot advances monotonically along the thinking
      for (int64_t j = 0; j < thinking_len; ++j, ++t) {
        while (segment_slot < num_slots && j >= cuts[segment_slot]) ++segment_slot;
        const int64_t thinking_slot_j = segment_slot < num_slots ? segment_slot : -1;
        const bool next_trained = j + 1 < thinking_len && (j + 1) < cuts[num_slots - 1];
        out_ids[t] = thinking[j];
        out_positions[t] = prompt_len + j;
        out_labels[t] = next_trained ? thinking[j + 1] : kIgnoreIndex;
        out_seq[t] = static_cast<int32_t>(n);
        out_kind[t] = kThinking;
        out_slot[t] = static_cast<int32_t>(thinking_slot_j);
        out_summary_index[t] = -1;
        out_prefix_end[t] = row_start;
        out_branch_start[t] = row_start;
      }
      // Branches: inserted delimiter of the slot's distinct cut, then the summary.
      for (int64_t s = 0; s < num_slots; ++s) {
        const int64_t inserted_segment = prompt_segment + 2 + distinct_local[s];
        const int64_t* inserted = tokens_ptr + segment_ptr[inserted_segment];
        const int64_t inserted_len = segment_ptr[inserted_segment + 1] - segment_ptr[inserted_segment];
        const int64_t visible_end = row_start + prompt_len + cuts[s];
        for (int64_t a = 0; a < num_summaries; ++a) {
          const int64_t summary_segment = prompt_segment + 2 + views[n].num_inserted + s * num_summaries + a;
          const int64_t* summary = tokens_ptr + segment_ptr[summary_segment];
          const int64_t summary_len = segment_ptr[summary_segment + 1] - segment_ptr[summary_segment];
          const int64_t branch_begin = t;
          const int64_t branch_len = inserted_len + summary_len;
          for (int64_t i = 0; i < branch_len; ++i, ++t) {
            const bool is_inserted = i < inserted_len;
            out_ids[t] = is_inserted ? inserted[i] : summary[i - inserted_len];
            out_positions[t] = prompt_len + cuts[s] + i;
            // Only summary tokens are trained targets: the label of position i is the next
            // branch token when that token is a summary token.
            out_labels[t] = (i + 1 < branch_len && i + 1 >= inserted_len) ? summary[i + 1 - inserted_len] : kIgnoreIndex;
            out_seq[t] = static_cast<int32_t>(n);
            out_kind[t] = is_inserted ? kInserted : kSummary;
            out_slot[t] = static_cast<int32_t>(s);
            out_summary_index[t] = static_cast<int32_t>(a);
            out_prefix_end[t] = static_cast<int32_t>(visible_end);
            out_branch_start[t] = static_cast<int32_t>(branch_begin);
          }
        }
      }
    }
  });

  at::Tensor loss_mask = labels.ne(kIgnoreIndex);
  return {input_ids, position_ids, labels, loss_mask, cu_seqlens, seq_ids,
          token_kind, slot, summary_index, prefix_end, branch_start};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anytime_kernels, m) {
  m.def(
      "pack_response_trees(Tensor tokens, Tensor segment_offsets, Tensor cut_lens, Tensor num_inserted, "
      "int num_summaries) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(anytime_kernels, CPU, m) {
  m.impl("pack_response_trees", &pack_response_trees_cpu);
}

}  // namespace anytime_kernels
