// Constants shared by the C++ ops and their Python mirror, anytime_kernels/constants.py;
// tests/test_constants.py reads this file and checks that the two agree.
#pragma once

#include <cstdint>

namespace anytime_kernels {

// Label of a position whose next token is not trained (torch's cross-entropy convention).
constexpr int64_t kIgnoreIndex = -100;

// Token kinds of the packed layout (anytime_kernels.TokenKind).
constexpr int8_t kPrompt = 0;
constexpr int8_t kThinking = 1;
constexpr int8_t kInserted = 2;
constexpr int8_t kSummary = 3;

// The outputs of pack_response_trees, in order (anytime_kernels.constants.PACKED_FIELDS).
constexpr const char* kPackedFields[] = {"input_ids",  "position_ids", "labels", "loss_mask",
                                         "cu_seqlens", "seq_ids",      "token_kind", "slot",
                                         "summary_index", "prefix_end", "branch_start"};

}  // namespace anytime_kernels
