// Intra-node dispatch, after notify: stage (each rank copies its rows once into its own NVLink buffer and
// lists, per destination, the tokens it sends there) and pull (each rank copies the rows it receives out
// of its peers' buffers into the final outputs, rank by rank, token order within a rank).
#include "kernels/api.cuh"
#include "kernels/common/barrier.cuh"
#include "kernels/common/buffer_layout.cuh"
#include "kernels/common/poison.cuh"
#include "kernels/common/token.cuh"
#include "runtime/errors.hpp"

namespace deep_ep {
namespace {

constexpr int kStageThreads = 1024;
constexpr int kPullThreads = 1024;
// 16-byte loads each lane keeps in flight: 32 warps x 32 lanes x 8 x 16 B = 128 KiB per SM, enough to
// cover HBM and NVLink latency with a few dozen SMs.
constexpr int kRowUnroll = 8;
// Scales held in registers per lane (64 covers hidden 8192 in FP8); more are copied after the row.
constexpr int kScaleWordsPerLane = 2;

// Send list of destination `dst`: an in-order compaction of is_token_in_rank[:, dst], one block-wide
// ballot scan per chunk of blockDim.x tokens. Also writes send_head[:, dst].
__device__ void build_send_list(const IntranodeDispatchStageArgs& args, const layout::DispatchRowLayout& rows,
                                int dst) {
    __shared__ int warp_counts[kStageThreads / kWarpSize];
    const int num_ranks = args.peers.num_ranks, rank = args.peers.rank;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    // Row of the first token we send to dst, in dst's recv_x: after everything ranks 0..rank-1 send it.
    const int first_recv_row = rank == 0 ? 0 : args.rank_prefix_matrix[(rank - 1) * num_ranks + dst];
    void* own = args.peers.buffers[rank];
    int sent_before_chunk = 0;
    for (int chunk = 0; chunk < args.num_tokens; chunk += blockDim.x) {
        const int token = chunk + threadIdx.x;
        const bool in_rank = token < args.num_tokens && args.is_token_in_rank[int64_t{token} * num_ranks + dst];
        const unsigned ballot = __ballot_sync(0xffffffffu, in_rank);
        if (lane == 0)
            warp_counts[warp] = __popc(ballot);
        __syncthreads();
        int before_warp = 0, chunk_total = 0;
        for (int w = 0; w < num_warps; ++w) {
            const int count = warp_counts[w];
            before_warp += w < warp ? count : 0;
            chunk_total += count;
        }
        const int position = sent_before_chunk + before_warp + __popc(ballot & ((1u << lane) - 1));
        if (in_rank)
            rows.send_list(own, args.num_tokens, dst)[position] = token;
        if (token < args.num_tokens && args.send_head != nullptr)
            args.send_head[int64_t{token} * num_ranks + dst] = in_rank ? first_recv_row + position : -1;
        sent_before_chunk += chunk_total;
        __syncthreads();  // warp_counts is rewritten by the next chunk
    }
}

}  // namespace

namespace intranode {

__global__ void __launch_bounds__(kStageThreads, 1) stage_tokens(IntranodeDispatchStageArgs args) {
    const NvlKernelBarrier barrier(args.peers, args.barrier);
    if (!barrier.passed())
        return;
    const layout::DispatchRowLayout rows(args.shape);
    void* own = args.peers.buffers[args.peers.rank];
    // Receivers locate the send lists with it; they read it after the pull barrier, which this kernel's
    // completion precedes.
    if (blockIdx.x == 0 && threadIdx.x == 0)
        *layout::staged_num_tokens(own) = args.num_tokens;
    // The first blocks also build the send lists; a list costs a few microseconds, a row copy pass more.
    for (int dst = blockIdx.x; dst < args.peers.num_ranks; dst += gridDim.x)
        build_send_list(args, rows, dst);
    if (!args.stage_rows)
        return;

    const int lane = threadIdx.x % kWarpSize;
    const int num_topk = args.shape.num_topk, num_scales = args.shape.num_scales;
    for (int token = global_warp_id(); token < args.num_tokens; token += num_global_warps()) {
        char* slot = rows.row(own, token);
        // The row's small parts are loaded first, so their latency hides under the hidden vector's.
        LaneWords<kScaleWordsPerLane> scales;
        const int* scales_row = reinterpret_cast<const int*>(args.x_scales + int64_t{token} * num_scales);
        if (args.x_scales != nullptr)
            scales.load(scales_row, num_scales, lane, [](const int* p) { return __ldg(p); });
        int expert = -1;
        float weight = 0.0f;
        if (args.topk_idx != nullptr && lane < num_topk) {
            const int64_t i = int64_t{token} * num_topk + lane;
            // Staged as int32: expert ids are small, and receivers read 4 bytes per entry.
            expert = args.topk_idx_is_int64 ? static_cast<int>(__ldg(static_cast<const int64_t*>(args.topk_idx) + i))
                                            : __ldg(static_cast<const int*>(args.topk_idx) + i);
            weight = __ldg(args.topk_weights + i);
        }
        const auto* x_row = static_cast<const char*>(args.x) + int64_t{token} * args.shape.hidden_bytes;
        warp_copy_own_vectors<kRowUnroll>(reinterpret_cast<int4*>(slot + rows.x_offset),
                                          reinterpret_cast<const int4*>(x_row), args.shape.hidden_bytes / 16, lane);
        if (args.x_scales != nullptr) {
            int* staged_scales = reinterpret_cast<int*>(slot + rows.scales_offset);
            scales.store(staged_scales, num_scales, lane);
            if (num_scales > scales.kCapacity)
                warp_copy_own_words(staged_scales + scales.kCapacity, scales_row + scales.kCapacity,
                                    num_scales - scales.kCapacity, lane);
        }
        if (args.topk_idx != nullptr && lane < num_topk) {
            reinterpret_cast<int*>(slot + rows.topk_idx_offset)[lane] = expert;
            reinterpret_cast<float*>(slot + rows.topk_weights_offset)[lane] = weight;
        }
    }
}

}  // namespace intranode

namespace {

// The source rank of recv_x row `row`: rows [first_row[s], first_row[s + 1]) come from rank s.
__device__ __forceinline__ int source_of_row(const int* first_row, int num_ranks, int row) {
    int src = 0;
    while (src + 1 < num_ranks && first_row[src + 1] <= row)
        ++src;
    return src;
}

// num_worst_tokens padding, as the reference defines it: zeros, expert -1, weight 0, source -1.
__device__ __forceinline__ void write_padding_row(const IntranodeDispatchPullArgs& args, int row, int lane) {
    const int4 zero = make_int4(0, 0, 0, 0);
    auto* x_row = reinterpret_cast<int4*>(static_cast<char*>(args.recv_x) + int64_t{row} * args.shape.hidden_bytes);
    for (int i = lane; i < args.shape.hidden_bytes / 16; i += kWarpSize)
        ptx::st_global_L1_no_allocate(x_row + i, zero);
    for (int i = lane; i < args.shape.num_scales && args.recv_x_scales != nullptr; i += kWarpSize)
        args.recv_x_scales[int64_t{row} * args.shape.num_scales + i] = 0.0f;
    for (int k = lane; k < args.shape.num_topk && args.recv_topk_idx != nullptr; k += kWarpSize) {
        args.recv_topk_idx[int64_t{row} * args.shape.num_topk + k] = -1;
        args.recv_topk_weights[int64_t{row} * args.shape.num_topk + k] = 0.0f;
    }
    if (lane == 0)
        args.recv_src_idx[row] = -1;
}

}  // namespace

// Named deep_ep::intranode::dispatch: profiler-based tools (DeepEP's test scripts among them) find this
// op's kernel by the substring "::dispatch", which no other kernel of ours contains.
namespace intranode {

template <ptx::LoadKind kKind>
__global__ void __launch_bounds__(kPullThreads, 1) dispatch(IntranodeDispatchPullArgs args) {
    NvlKernelBarrier barrier(args.peers, args.barrier);
    const auto poison_outputs = [&] {
        poison::poison_dispatch_rows({args.recv_x, args.recv_x_scales, args.recv_topk_idx, args.recv_topk_weights,
                                      args.recv_src_idx, args.shape.hidden_bytes, args.shape.num_scales,
                                      args.shape.num_topk},
                                     args.num_recv_capacity);
    };
    if (!barrier.passed())
        return poison_outputs();  // a peer never arrived (the Buffer reports it)
    const int num_ranks = args.peers.num_ranks, rank = args.peers.rank;
    if (args.check_verdict && ptx::ld_volatile_global(layout::dispatch_verdict(args.peers.buffers[rank])) != 0) {
        // Every rank rejected this dispatch alike (its notify): no rank reads, each poisons its outputs.
        poison_outputs();
        barrier.close(args.peers, args.barrier);
        return;
    }
    const layout::DispatchRowLayout rows(args.shape);
    // recv_x rows [first_row[s], first_row[s + 1]) come from rank s, in the order of s's send list to us.
    __shared__ int first_row[kMaxNvlRanks + 1];
    __shared__ int peer_num_tokens[kMaxNvlRanks];
    if (threadIdx.x <= num_ranks)
        first_row[threadIdx.x] = threadIdx.x == 0 ? 0 : args.rank_prefix_matrix[(threadIdx.x - 1) * num_ranks + rank];
    if (threadIdx.x < num_ranks)
        peer_num_tokens[threadIdx.x] = ptx::ld_volatile_global(layout::staged_num_tokens(args.peers.buffers[threadIdx.x]));
    __syncthreads();
    const int num_recv = first_row[num_ranks];
    const int lane = threadIdx.x % kWarpSize;
    const int num_topk = args.shape.num_topk, num_scales = args.shape.num_scales;
    const int num_local_experts = args.num_experts / num_ranks;
    const int first_local_expert = rank * num_local_experts;

    // A warp's rows are row0 + j * stride. Lane i fetches the source token of the warp's next 32 rows up
    // front: otherwise every row would start with one dependent round trip to a peer before its copy.
    const int stride = num_global_warps();
    for (int row0 = global_warp_id(); row0 < args.num_recv_capacity; row0 += kWarpSize * stride) {
        int lane_token = -1;
        if (const int lane_row = row0 + lane * stride; lane_row < num_recv) {
            const int src = source_of_row(first_row, num_ranks, lane_row);
            lane_token = ptx::ld_peer<kKind>(rows.send_list(args.peers.buffers[src], peer_num_tokens[src], rank) +
                                             (lane_row - first_row[src]));
        }
        for (int i = 0; i < kWarpSize; ++i) {
            const int row = row0 + i * stride;
            if (row >= args.num_recv_capacity)
                break;
            const int token = __shfl_sync(0xffffffffu, lane_token, i);
            if (row >= num_recv) {
                write_padding_row(args, row, lane);
                continue;
            }
            const int src = source_of_row(first_row, num_ranks, row);
            const DispatchSources& from = args.sources;
            // Scales and top-k first: their loads fly with the hidden vector's instead of after it.
            const int* src_scales = reinterpret_cast<const int*>(from.scales[src] + token * from.scales_stride);
            LaneWords<kScaleWordsPerLane> scales;
            if (args.recv_x_scales != nullptr)
                scales.load(src_scales, num_scales, lane, [](const int* p) { return ptx::ld_peer<kKind>(p); });
            int expert = -1, weight_bits = 0;
            if (args.recv_topk_idx != nullptr && lane < num_topk) {
                const int* ids = reinterpret_cast<const int*>(from.topk_idx[src] + token * from.topk_idx_stride);
                expert = ptx::ld_peer<kKind>(ids + (from.topk_idx_is_int64 ? 2 * lane : lane));
                weight_bits = ptx::ld_peer<kKind>(
                    reinterpret_cast<const int*>(from.topk_weights[src] + token * from.topk_weights_stride) + lane);
            }
            warp_copy_peer_vectors<kKind, kRowUnroll>(
                reinterpret_cast<int4*>(static_cast<char*>(args.recv_x) + int64_t{row} * args.shape.hidden_bytes),
                reinterpret_cast<const int4*>(from.x[src] + token * from.x_stride), args.shape.hidden_bytes / 16, lane);
            if (args.recv_x_scales != nullptr) {
                int* recv_scales = reinterpret_cast<int*>(args.recv_x_scales + int64_t{row} * num_scales);
                scales.store(recv_scales, num_scales, lane);
                if (num_scales > scales.kCapacity)
                    warp_copy_peer_words<kKind>(recv_scales + scales.kCapacity, src_scales + scales.kCapacity,
                                                num_scales - scales.kCapacity, lane);
            }
            if (args.recv_topk_idx != nullptr && lane < num_topk) {
                const int local = expert - first_local_expert;
                const bool is_local = expert >= 0 && local >= 0 && local < num_local_experts;
                args.recv_topk_idx[int64_t{row} * num_topk + lane] = is_local ? local : -1;
                args.recv_topk_weights[int64_t{row} * num_topk + lane] = is_local ? __int_as_float(weight_bits) : 0.0f;
            }
            if (lane == 0)
                args.recv_src_idx[row] = token;
        }
    }
    barrier.close(args.peers, args.barrier);
}

}  // namespace intranode

namespace {

int clamp_blocks(int num_blocks) { return num_blocks < 1 ? 1 : num_blocks; }

}  // namespace

void launch_intranode_dispatch_stage(const IntranodeDispatchStageArgs& args) {
    DEEP_EP_CHECK(args.shape.num_topk <= kWarpSize, "at most " << kWarpSize << " top-k entries per token");
    DEEP_EP_CHECK(args.shape.hidden_bytes % 16 == 0, "the bytes of one x row must be a multiple of 16");
    DEEP_EP_CHECK(args.topk_idx == nullptr || args.topk_weights != nullptr, "topk_idx needs topk_weights");
    intranode::stage_tokens<<<clamp_blocks(args.num_blocks), kStageThreads, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

void launch_intranode_dispatch_pull(const IntranodeDispatchPullArgs& args) {
    DEEP_EP_CHECK(args.shape.hidden_bytes % 16 == 0, "the bytes of one x row must be a multiple of 16");
    DEEP_EP_CHECK((args.recv_topk_idx == nullptr) == (args.recv_topk_weights == nullptr),
                  "recv_topk_idx and recv_topk_weights come together");
    auto kernel = intranode::dispatch<ptx::LoadKind::kConservative>;
    if constexpr (ptx::kAggressiveLoadsCompiled) {
        if (!args.conservative_loads)
            kernel = intranode::dispatch<ptx::LoadKind::kAggressive>;
    }
    kernel<<<clamp_blocks(args.num_blocks), kPullThreads, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
