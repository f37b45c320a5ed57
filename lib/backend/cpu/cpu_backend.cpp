#include "backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <string>

#include "backend/cpu/cpu_ops.h"
#include "common/error.h"
#include "model/rope.h"

namespace pyr {

// ---- KV storage -----------------------------------------------------------------------

bool KvBudget::try_take(uint64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (limit_ > 0 && used_ + bytes > limit_) return false;
    used_ += bytes;
    peak_ = std::max(peak_, used_);
    return true;
}

uint64_t KvBudget::used() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return used_;
}

uint64_t KvBudget::peak() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return peak_;
}

void KvBudget::take(uint64_t bytes) {
    if (try_take(bytes)) return;
    std::lock_guard<std::mutex> lock(mutex_);
    fail(PYR_ERR_OUT_OF_MEMORY,
         "memory budget exceeded: " + std::to_string(bytes) + " more bytes for the KV cache on "
         "top of " + std::to_string(used_) + " held by the engine's sessions would pass the "
         "budget of " + std::to_string(limit_) + " (max_device_bytes)");
}

void KvBudget::give_back(uint64_t bytes) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    used_ -= std::min(used_, bytes);
}

CpuKvStorage::CpuKvStorage(int n_layer, int32_t n_ctx, int32_t kv_dim,
                           std::shared_ptr<KvBudget> budget)
    : layers_(size_t(n_layer)), n_ctx_(n_ctx), kv_dim_(kv_dim), budget_(std::move(budget)) {
    PYR_ASSERT(n_layer > 0 && n_ctx > 0 && kv_dim > 0);
}

CpuKvStorage::~CpuKvStorage() {
    if (!budget_) return;
    for (int il = 0; il < int(layers_.size()); ++il) budget_->give_back(held_bytes(il));
}

int32_t CpuKvStorage::capacity(int il) const {
    return int32_t(layers_[size_t(il)].k.capacity() / size_t(kv_dim_));
}

uint64_t CpuKvStorage::held_bytes(int il) const {
    const Layer& l = layers_[size_t(il)];
    return (l.k.capacity() + l.v.capacity()) * sizeof(float);
}

// The room a layer of `tokens` tokens keeps beyond them: an eighth more, at least 16 tokens,
// so that a growing cache is copied to a bigger buffer only every n/8 tokens while at most
// about 12 % of its room stays unused (doubling left up to half).
int32_t CpuKvStorage::room_for(int32_t tokens) const {
    return std::min(n_ctx_, tokens + std::max(16, tokens / 8));
}

void CpuKvStorage::close_gap(Layer& layer) {
    if (layer.start == 0) return;
    const size_t row = size_t(kv_dim_), from = size_t(layer.start) * row;
    const size_t n = layer.k.size() - from;
    std::memmove(layer.k.data(), layer.k.data() + from, n * sizeof(float));
    std::memmove(layer.v.data(), layer.v.data() + from, n * sizeof(float));
    layer.k.resize(n);
    layer.v.resize(n);
    layer.start = 0;
}

void CpuKvStorage::make_room(int il, int32_t n_new) {
    Layer& layer = layers_[size_t(il)];
    const size_t row = size_t(kv_dim_);
    const int32_t need = size(il) + n_new, cap = capacity(il);
    PYR_ASSERT(n_new >= 0 && need <= n_ctx_);
    if (need <= cap - layer.start) return;  // room after the tokens
    close_gap(layer);  // the room before them too (and a growth copies the tokens alone)
    if (need <= cap) return;
    // A first fill (a prefill) gets what it needs, growth the usual spare room. Near the
    // budget, what is needed only, and if even that does not fit, the session's other layers
    // give their spare room back first (else the layers that grew earlier in a step would
    // keep theirs and a later one would fail).
    int32_t want = cap == 0 ? need : room_for(need);
    auto bytes = [&](int32_t tokens) { return 2 * uint64_t(tokens - cap) * row * sizeof(float); };
    if (budget_ && !budget_->try_take(bytes(want)) && !budget_->try_take(bytes(want = need))) {
        for (int other = 0; other < int(layers_.size()); ++other)
            if (other != il) shrink_room(other, size(other));
        budget_->take(bytes(want));
    }
    const uint64_t before = held_bytes(il);
    try {
        layer.k.reserve(size_t(want) * row);
        layer.v.reserve(size_t(want) * row);
    } catch (const std::bad_alloc&) {
        if (budget_) budget_->give_back(bytes(want) - (held_bytes(il) - before));  // not grown
        fail(PYR_ERR_OUT_OF_MEMORY, "out of memory growing the KV cache to " +
                                        std::to_string(want) + " tokens");
    }
}

// Layer il's room cut to `tokens` (>= its size) by a copy, giving the bytes back; when even
// the smaller copy cannot be had, the layer keeps its room.
void CpuKvStorage::shrink_room(int il, int32_t tokens) {
    Layer& layer = layers_[size_t(il)];
    if (tokens >= capacity(il)) return;
    const uint64_t before = held_bytes(il);
    const size_t from = size_t(layer.start) * size_t(kv_dim_);
    try {
        std::vector<float> k, v;
        k.reserve(size_t(tokens) * size_t(kv_dim_));
        v.reserve(size_t(tokens) * size_t(kv_dim_));
        k.assign(layer.k.begin() + std::ptrdiff_t(from), layer.k.end());
        v.assign(layer.v.begin() + std::ptrdiff_t(from), layer.v.end());
        layer.k.swap(k);
        layer.v.swap(v);
        layer.start = 0;
    } catch (const std::bad_alloc&) {
        return;
    }
    if (budget_) budget_->give_back(before - held_bytes(il));
}

// A layer with more than twice its usual spare room unused (compressed, or a step rolled
// back) gives the excess back, so that other sessions can have it; the margin keeps a cache
// that compresses a little every few steps from being copied each time. An empty layer
// gives everything back.
void CpuKvStorage::release_spare_room(int il) {
    const int32_t n = size(il);
    if (n == 0) shrink_room(il, 0);
    else if (capacity(il) - n > 2 * (room_for(n) - n)) shrink_room(il, room_for(n));
}

uint64_t CpuKvStorage::bytes_per_token() const {
    return 2 * uint64_t(kv_dim_) * sizeof(float);
}

void CpuKvStorage::append(int il, const float* k, const float* v, int32_t n) {
    PYR_ASSERT(n >= 0 && size(il) + n <= n_ctx_);
    make_room(il, n);
    Layer& layer = layers_[size_t(il)];
    const size_t row = size_t(kv_dim_);
    layer.k.insert(layer.k.end(), k, k + size_t(n) * row);
    layer.v.insert(layer.v.end(), v, v + size_t(n) * row);
}

void CpuKvStorage::retain(int il, const std::vector<int32_t>& keep) {
    Layer& layer = layers_[size_t(il)];
    const int32_t have = size(il), n_keep = int32_t(keep.size()), shift = have - n_keep;
    const size_t row = size_t(kv_dim_), base = size_t(layer.start) * row;
    for (size_t i = 0; i < keep.size(); ++i)
        PYR_ASSERT(keep[i] >= 0 && keep[i] < have && (i == 0 || keep[i] > keep[i - 1]));
    // The kept rows end up in order at the front or at the back, whichever moves fewer.
    const RetainMoves moves = retain_moves(keep, have);
    auto move = [&](int32_t i, int32_t to) {
        const size_t src = base + size_t(keep[size_t(i)]) * row, dst = base + size_t(to) * row;
        std::memmove(&layer.k[dst], &layer.k[src], row * sizeof(float));
        std::memmove(&layer.v[dst], &layer.v[src], row * sizeof(float));
    };
    if (!moves.toward_back()) {
        for (int32_t i = moves.first_moved; i < n_keep; ++i) move(i, i);  // keep[i] >= i
        layer.k.resize(base + size_t(n_keep) * row);
        layer.v.resize(base + size_t(n_keep) * row);
    } else {
        for (int32_t i = moves.back_moved; i-- > 0;) move(i, i + shift);  // keep[i] <= i + shift
        layer.start += shift;
    }
    rows_moved_ += uint64_t(moves.rows_moved(moves.toward_back()));
    release_spare_room(il);
}

void CpuKvStorage::truncate(int il, int32_t n) {
    PYR_ASSERT(n >= 0 && n <= size(il));
    Layer& layer = layers_[size_t(il)];
    layer.k.resize(size_t(layer.start + n) * size_t(kv_dim_));
    layer.v.resize(size_t(layer.start + n) * size_t(kv_dim_));
    release_spare_room(il);
}

// ---- construction and checks ----------------------------------------------------------

namespace {

void check_tensor(const Tensor& t, int64_t rows, int64_t cols, const std::string& name,
                  bool optional = false) {
    if (optional && !t) return;
    if (!t || t.rows * t.cols != rows * cols || (cols > 1 && t.cols != cols))
        fail(PYR_ERR_INVALID_ARGUMENT,
             "cpu backend: weight " + name + " is [" + std::to_string(t.rows) + ", " +
                 std::to_string(t.cols) + "]" + (t ? "" : " (absent)") + ", expected [" +
                 std::to_string(rows) + ", " + std::to_string(cols) + "]");
}

void check_weights(const ModelConfig& c, const ModelWeights& w) {
    if (c.n_head <= 0 || c.n_head_kv <= 0 || c.n_head % c.n_head_kv != 0 ||
        c.head_dim <= 0 || c.head_dim % 2 != 0 || c.n_layer <= 0)
        fail(PYR_ERR_INVALID_ARGUMENT, "cpu backend: unsupported head layout (n_head " +
                                           std::to_string(c.n_head) + ", n_head_kv " +
                                           std::to_string(c.n_head_kv) + ", head_dim " +
                                           std::to_string(c.head_dim) + ")");
    const int64_t H = c.n_embd, Q = int64_t(c.n_head) * c.head_dim;
    const int64_t KV = int64_t(c.n_head_kv) * c.head_dim, F = c.n_ff;
    check_tensor(w.tok_embd, c.n_vocab, H, "tok_embd");
    check_tensor(w.output_norm, H, 1, "output_norm");
    check_tensor(w.output, c.n_vocab, H, "output");
    if (int(w.layers.size()) != c.n_layer)
        fail(PYR_ERR_INVALID_ARGUMENT, "cpu backend: " + std::to_string(w.layers.size()) +
                                           " layers of weights for n_layer " +
                                           std::to_string(c.n_layer));
    for (size_t il = 0; il < w.layers.size(); ++il) {
        const LayerWeights& L = w.layers[il];
        const std::string p = "layers." + std::to_string(il) + ".";
        check_tensor(L.attn_norm, H, 1, p + "attn_norm");
        check_tensor(L.wq, Q, H, p + "wq");
        check_tensor(L.wk, KV, H, p + "wk");
        check_tensor(L.wv, KV, H, p + "wv");
        check_tensor(L.wo, H, Q, p + "wo");
        check_tensor(L.bq, Q, 1, p + "bq", true);
        check_tensor(L.bk, KV, 1, p + "bk", true);
        check_tensor(L.bv, KV, 1, p + "bv", true);
        check_tensor(L.bo, H, 1, p + "bo", true);
        check_tensor(L.ffn_norm, H, 1, p + "ffn_norm");
        check_tensor(L.w_gate, F, H, p + "w_gate");
        check_tensor(L.w_up, F, H, p + "w_up");
        check_tensor(L.w_down, H, F, p + "w_down");
        check_tensor(L.b_gate, F, 1, p + "b_gate", true);
        check_tensor(L.b_up, F, 1, p + "b_up", true);
        check_tensor(L.b_down, H, 1, p + "b_down", true);
    }
}

CpuKvStorage& cpu_storage(KvCache& cache) {
    auto* storage = dynamic_cast<CpuKvStorage*>(&cache.storage());
    PYR_ASSERT(storage != nullptr);
    return *storage;
}

}  // namespace

CpuBackend::CpuBackend(const ModelConfig& config, const ModelWeights& weights, int n_threads,
                       std::shared_ptr<const void> owner, uint64_t max_kv_bytes)
    : owner_(std::move(owner)), config_(config), weights_(weights), pool_(n_threads),
      kv_budget_(std::make_shared<KvBudget>(max_kv_bytes)) {
    check_weights(config_, weights_);
}

DeviceMemory CpuBackend::device_memory() const {
    DeviceMemory m;
    m.kv = kv_budget_->used();
    m.peak = kv_budget_->peak();
    m.limit = kv_budget_->limit();
    return m;
}

std::unique_ptr<KvStorage> CpuBackend::new_kv_storage(int32_t n_ctx) {
    return std::make_unique<CpuKvStorage>(config_.n_layer, n_ctx,
                                          config_.n_head_kv * config_.head_dim, kv_budget_);
}

uint64_t CpuBackend::kv_storage_bytes(int32_t n_ctx) const {  // growth stops at n_ctx
    return uint64_t(std::max(n_ctx, 0)) * uint64_t(config_.n_layer) * 2 *
           uint64_t(config_.n_head_kv) * uint64_t(config_.head_dim) * sizeof(float);
}

void CpuBackend::check_step(const SequenceStep& step) const {
    check_sequence_step(config_, step, "cpu backend");
    PYR_ASSERT(cpu_storage(*step.cache).kv_dim() == config_.n_head_kv * config_.head_dim);
}

void CpuBackend::resize_scratch(int32_t n_tokens) {
    const ModelConfig& c = config_;
    const size_t n = size_t(n_tokens);
    auto grow = [](std::vector<float>& v, size_t need) {
        if (v.size() < need) v.resize(need);
    };
    grow(s_.x, n * size_t(c.n_embd));
    grow(s_.xn, n * size_t(c.n_embd));
    grow(s_.tmp, n * size_t(c.n_embd));
    grow(s_.q, n * size_t(c.n_head) * size_t(c.head_dim));
    grow(s_.att, n * size_t(c.n_head) * size_t(c.head_dim));
    grow(s_.k, n * size_t(c.n_head_kv) * size_t(c.head_dim));
    grow(s_.v, n * size_t(c.n_head_kv) * size_t(c.head_dim));
    grow(s_.gate, n * size_t(c.n_ff));
    grow(s_.up, n * size_t(c.n_ff));
    grow(s_.cos, n * size_t(c.head_dim / 2));
    grow(s_.sin, n * size_t(c.head_dim / 2));
}

void CpuBackend::forward(SequenceStep* batch, int n_seq) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int i = 0; i < n_seq; ++i) check_step(batch[i]);
    for (int i = 0; i < n_seq; ++i) forward_sequence(batch[i], batch, n_seq);
}

// ---- the forward pass -----------------------------------------------------------------

// One sequence through the model (HF LlamaForCausalLM): its new keys/values join the cache
// and the last token's logits are written. With a KV policy, each layer's attention is
// observed and the policy may prune that layer's cache -- and, when it shrinks the prefill,
// drop the pruned tokens from the sequence so that deeper layers compute on fewer tokens.
void CpuBackend::forward_sequence(const SequenceStep& step, const SequenceStep* batch,
                                  int n_seq) {
    const ModelConfig& c = config_;
    const ModelWeights& w = weights_;
    int32_t n = step.n_tokens;  // tokens still in flight (fewer after a shrinking layer)
    const int hd = c.head_dim;
    const int64_t n_embd = c.n_embd;
    KvCache& cache = *step.cache;
    CpuKvStorage& kv = cpu_storage(cache);
    resize_scratch(n);
    float* x = s_.x.data();      // (n, n_embd) the residual stream
    float* xn = s_.xn.data();    // (n, n_embd) normed input of a block
    float* tmp = s_.tmp.data();  // (n, n_embd) output of a block
    float* q = s_.q.data();      // (n, n_head * hd)
    float* k = s_.k.data();      // (n, n_head_kv * hd)
    float* v = s_.v.data();      // (n, n_head_kv * hd)
    float* att = s_.att.data();  // (n, n_head * hd)
    float* gate = s_.gate.data();  // (n, n_ff)
    float* up = s_.up.data();      // (n, n_ff)
    s_.pos.assign(step.positions, step.positions + n);

    // RoPE tables at the tokens' positions: cos, sin (n, hd/2). Dynamic scaling sees the
    // sequence length of the HF forward this step stands for (rope_seq_len).
    rope_cos_sin(rope_inv_freq(c, rope_seq_len(step)), step.positions, n, s_.cos.data(),
                 s_.sin.data());

    cpu::embed(w.tok_embd, step.tokens, n, x);
    for (int il = 0; il < c.n_layer; ++il) {
        check_cancel(batch, n_seq);  // a cancel anywhere in the batch stops it (Engine)
        const LayerWeights& L = w.layers[size_t(il)];

        // attention block: x += o_proj(attention(rope(q), cache + rope(k), v))
        cpu::rmsnorm(x, n, L.attn_norm, c.rms_norm_eps, xn);
        cpu::matmul(pool_, xn, n, {{&L.wq, &L.bq, q}, {&L.wk, &L.bk, k}, {&L.wv, &L.bv, v}});
        cpu::rope_apply(q, n, c.n_head, hd, s_.cos.data(), s_.sin.data());
        cpu::rope_apply(k, n, c.n_head_kv, hd, s_.cos.data(), s_.sin.data());
        PYR_ASSERT(kv.size(il) == cache.size(il));
        const int32_t first_new = cache.size(il);  // cache slot of this step's first token
        kv.append(il, k, v, n);
        cache.appended(il, s_.pos.data(), n);
        cpu::AttentionArgs args;
        args.q = q;
        args.q_pos = s_.pos.data();
        args.n_q = n;
        args.k = kv.keys(il);
        args.v = kv.values(il);
        args.kv_pos = cache.positions(il).data();
        args.n_kv = cache.size(il);
        args.n_head = c.n_head;
        args.n_head_kv = c.n_head_kv;
        args.head_dim = hd;
        args.out = att;
        const ObservationRequest req = step.policy ? step.policy->observe(il) : ObservationRequest{};
        const int32_t n_rows = std::min(req.last_rows, n);
        prepare_observation(req, n, args);
        cpu::attention(pool_, args);
        cpu::matmul(pool_, att, n, {{&L.wo, &L.bo, tmp}});
        cpu::add(x, tmp, n * n_embd);

        // the policy's keep/drop decision for this layer (lib/kv/)
        if (step.policy) {
            const Observation obs = finish_observation(req, n_rows, args.n_kv);
            if (auto keep = step.policy->on_layer(il, obs, cache)) {
                cache.retain(il, *keep);
                if (step.policy->shrink_prefill(il)) n = shrink_rows(*keep, first_new, n);
            }
        }

        // MLP block: x += down(silu(gate(xn)) * up(xn))
        cpu::rmsnorm(x, n, L.ffn_norm, c.rms_norm_eps, xn);
        cpu::matmul(pool_, xn, n, {{&L.w_gate, &L.b_gate, gate}, {&L.w_up, &L.b_up, up}});
        cpu::silu_mul(gate, up, n * int64_t(c.n_ff));
        cpu::matmul(pool_, gate, n, {{&L.w_down, &L.b_down, tmp}});
        cpu::add(x, tmp, n * n_embd);
    }
    if (!step.logits) return;

    // output head on the last token only: logits (n_vocab)
    cpu::rmsnorm(x + (n - 1) * n_embd, 1, w.output_norm, c.rms_norm_eps, xn);
    cpu::matmul(pool_, xn, 1, {{&w.output, nullptr, step.logits}});
}

// Points the attention's optional outputs at scratch for what the policy asked.
void CpuBackend::prepare_observation(const ObservationRequest& req, int32_t n,
                                     cpu::AttentionArgs& args) {
    const size_t heads = size_t(config_.n_head), n_kv = size_t(args.n_kv);
    const int32_t n_rows = std::min(req.last_rows, n);
    if (n_rows > 0) {
        s_.probs.resize(size_t(n_rows) * heads * n_kv);
        args.probs = s_.probs.data();
        args.probs_from = n - n_rows;
    }
    if (req.column_sums) {
        s_.col_sums.assign(heads * n_kv, 0.0f);
        args.col_sums = s_.col_sums.data();
    }
}

// Averages the per-head observations over the query heads.
Observation CpuBackend::finish_observation(const ObservationRequest& req, int32_t n_rows,
                                           int32_t n_kv) {
    const int heads = config_.n_head;
    const float inv = 1.0f / float(heads);
    Observation obs;
    obs.n_keys = n_kv;
    if (n_rows > 0) {
        s_.obs_rows.assign(size_t(n_rows) * size_t(n_kv), 0.0f);
        for (int32_t r = 0; r < n_rows; ++r)
            for (int h = 0; h < heads; ++h) {
                const float* p = s_.probs.data() + (int64_t(r) * heads + h) * n_kv;
                float* row = s_.obs_rows.data() + int64_t(r) * n_kv;
                for (int32_t j = 0; j < n_kv; ++j) row[j] += p[j] * inv;
            }
        obs.n_rows = n_rows;
        obs.rows = s_.obs_rows.data();
    }
    if (req.column_sums) {
        s_.obs_sums.assign(size_t(n_kv), 0.0f);
        for (int h = 0; h < heads; ++h)
            for (int32_t j = 0; j < n_kv; ++j)
                s_.obs_sums[size_t(j)] += s_.col_sums[size_t(h) * size_t(n_kv) + size_t(j)] * inv;
        obs.column_sums = s_.obs_sums.data();
    }
    return obs;
}

// After the layer kept cache slots `keep`, only the kept ones among this step's tokens
// (slots first_new..first_new+n-1) go on: compacts their residual rows, positions and RoPE
// tables in order. Returns the new token count.
int32_t CpuBackend::shrink_rows(const std::vector<int32_t>& keep, int32_t first_new, int32_t n) {
    const size_t n_embd = size_t(config_.n_embd), half = size_t(config_.head_dim / 2);
    int32_t out = 0;
    for (int32_t slot : keep) {
        const int32_t row = slot - first_new;
        if (row < 0) continue;
        if (row != out) {  // row > out: moving rows forward is safe
            std::copy_n(&s_.x[size_t(row) * n_embd], n_embd, &s_.x[size_t(out) * n_embd]);
            std::copy_n(&s_.cos[size_t(row) * half], half, &s_.cos[size_t(out) * half]);
            std::copy_n(&s_.sin[size_t(row) * half], half, &s_.sin[size_t(out) * half]);
            s_.pos[size_t(out)] = s_.pos[size_t(row)];
        }
        ++out;
    }
    // The last token must stay: its logits are the step's output.
    PYR_ASSERT(out > 0 && keep.back() == first_new + n - 1);
    return out;
}

// ---- factory --------------------------------------------------------------------------

std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<const Model> model, int n_threads,
                                          uint64_t max_kv_bytes) {
    PYR_ASSERT(model != nullptr);
    const ModelConfig& config = model->config();
    const ModelWeights& weights = model->weights();
    return std::make_unique<CpuBackend>(config, weights, n_threads, std::move(model), max_kv_bytes);
}

}  // namespace pyr
