// Paged decode attention on the CPU (definitions: anytime_kernels/paged_attention_reference.py).
//
// One new token per row attends to the row's first seq_lens[b] keys, read in place from the KV
// pool [num_blocks, block_size, Hkv, D] through the row's block table: nothing is gathered or
// padded, so a step reads each key and value once. One work item per (row, kv head) holds the
// G = Hq / Hkv query heads of that kv head and walks the row block by block with an online
// softmax in fp32 (scores of a block, then one rescale of the running sum and output per block).
//
// The Python wrapper (anytime_kernels/paged_attention.py) validates every input before calling
// here; the checks below guard the op when it is called directly.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace anytime_kernels {
namespace {

// Keys per parallel work item (summed over its rows' lengths and G); smaller inputs run inline.
constexpr int64_t kGrainKeys = 16384;

// q . key over head_dim with eight partial sums: the compiler vectorizes them (a single running sum
// it may not reorder, without -ffast-math).
template <typename scalar_t>
inline float dot(const float* q, const scalar_t* key, int64_t head_dim) {
  float partial[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t d = 0;
  for (; d + 8 <= head_dim; d += 8) {
    for (int64_t lane = 0; lane < 8; ++lane) partial[lane] += q[d + lane] * static_cast<float>(key[d + lane]);
  }
  float sum = 0.0f;
  for (; d < head_dim; ++d) sum += q[d] * static_cast<float>(key[d]);
  for (int64_t lane = 0; lane < 8; ++lane) sum += partial[lane];
  return sum;
}

template <typename scalar_t>
void decode_rows(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                 const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, at::Tensor& out,
                 at::Tensor& lse) {
  const int64_t batch = query.size(0), num_q_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t stride_block = key_cache.stride(0), stride_token = key_cache.stride(1),
                stride_head = key_cache.stride(2);
  const int64_t value_stride_block = value_cache.stride(0), value_stride_token = value_cache.stride(1),
                value_stride_head = value_cache.stride(2);
  const int64_t table_width = block_tables.size(1);
  const scalar_t* q_data = query.data_ptr<scalar_t>();
  const scalar_t* k_data = key_cache.data_ptr<scalar_t>();
  const scalar_t* v_data = value_cache.data_ptr<scalar_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lengths = seq_lens.data_ptr<int64_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  float* lse_data = lse.data_ptr<float>();
  const int64_t items = batch * num_kv_heads;
  int64_t total_keys = 0;
  for (int64_t row = 0; row < batch; ++row) total_keys += lengths[row];
  const int64_t keys_per_item = std::max<int64_t>(1, total_keys * group / std::max<int64_t>(1, batch));
  const int64_t grain = std::max<int64_t>(1, kGrainKeys / keys_per_item);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * head_dim), acc(group * head_dim), scores(group * block_size);
    std::vector<float> running_max(group), running_sum(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t length = lengths[row];
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* source = q_data + (row * num_q_heads + kv_head * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) q[g * head_dim + d] = static_cast<float>(source[d]) * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(running_max.begin(), running_max.end(), kNegInf);
      std::fill(running_sum.begin(), running_sum.end(), 0.0f);
      for (int64_t first = 0; first < length; first += block_size) {
        const int64_t block = tables[row * table_width + first / block_size];
        const int64_t count = std::min(block_size, length - first);
        const scalar_t* keys = k_data + block * stride_block + kv_head * stride_head;
        const scalar_t* values = v_data + block * value_stride_block + kv_head * value_stride_head;
        for (int64_t g = 0; g < group; ++g) {
          const float* q_row = q.data() + g * head_dim;
          float* score_row = scores.data() + g * block_size;
          float block_max = kNegInf;
          for (int64_t t = 0; t < count; ++t) {
            const float score = dot(q_row, keys + t * stride_token, head_dim);
            score_row[t] = score;
            block_max = std::max(block_max, score);
          }
          // Every block holds at least one key, so new_max is finite and no exp sees inf - inf.
          const float new_max = std::max(running_max[g], block_max);
          const float rescale = std::exp(running_max[g] - new_max);
          float* acc_row = acc.data() + g * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) acc_row[d] *= rescale;
          float block_sum = 0.0f;
          for (int64_t t = 0; t < count; ++t) {
            const float weight = std::exp(score_row[t] - new_max);
            block_sum += weight;
            const scalar_t* value = values + t * value_stride_token;
            for (int64_t d = 0; d < head_dim; ++d) acc_row[d] += weight * static_cast<float>(value[d]);
          }
          running_sum[g] = running_sum[g] * rescale + block_sum;
          running_max[g] = new_max;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t head = kv_head * group + g;
        scalar_t* target = out_data + (row * num_q_heads + head) * head_dim;
        const float inverse = running_sum[g] > 0.0f ? 1.0f / running_sum[g] : 0.0f;
        for (int64_t d = 0; d < head_dim; ++d) target[d] = static_cast<scalar_t>(acc[g * head_dim + d] * inverse);
        lse_data[row * num_q_heads + head] =
            running_sum[g] > 0.0f ? running_max[g] + std::log(running_sum[g]) : kNegInf;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> paged_decode_attention_cpu(const at::Tensor& query_in,
                                                              const at::Tensor& key_cache,
                                                              const at::Tensor& value_cache,
                                                              const at::Tensor& block_tables_in,
                                                              const at::Tensor& seq_lens_in, double scale) {
  TORCH_CHECK_VALUE(query_in.dim() == 3, "query must be [B, Hq, D], got shape ", query_in.sizes());
  TORCH_CHECK_VALUE(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
                    "key_cache and value_cache must both be [num_blocks, block_size, Hkv, D], got shapes ",
                    key_cache.sizes(), " and ", value_cache.sizes());
  TORCH_CHECK_VALUE(key_cache.stride(3) == 1 && value_cache.stride(3) == 1,
                    "key_cache and value_cache must be contiguous along head_dim");
  const int64_t batch = query_in.size(0), num_q_heads = query_in.size(1), num_kv_heads = key_cache.size(2);
  TORCH_CHECK_VALUE(query_in.size(2) == key_cache.size(3) && num_q_heads % num_kv_heads == 0,
                    "query [B, Hq, D] ", query_in.sizes(), " does not fit the cache ", key_cache.sizes());
  TORCH_CHECK_VALUE(query_in.scalar_type() == key_cache.scalar_type() &&
                        value_cache.scalar_type() == key_cache.scalar_type(),
                    "query, key_cache and value_cache must share one dtype");
  TORCH_CHECK_VALUE(block_tables_in.dim() == 2 && block_tables_in.size(0) == batch && seq_lens_in.dim() == 1 &&
                        seq_lens_in.size(0) == batch,
                    "block_tables must be [B, max_blocks] and seq_lens [B] with B = ", batch);
  const at::Tensor query = query_in.contiguous();
  const at::Tensor block_tables = block_tables_in.to(at::kLong).contiguous();
  const at::Tensor seq_lens = seq_lens_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty({batch, num_q_heads}, query.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
    decode_rows<scalar_t>(query, key_cache, value_cache, block_tables, seq_lens, scale, out, lse);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anytime_kernels, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(anytime_kernels, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention_cpu); }

}  // namespace anytime_kernels
