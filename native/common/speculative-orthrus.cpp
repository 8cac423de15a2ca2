// orthrus-gguf: self-drafting with the diffusion view of an orthrus-qwen3 target.
// See speculative-orthrus.h; the loop and the policy follow orthrus_gguf/decode.py and
// orthrus_gguf/policy.py of the Python runtime.

#include "speculative-orthrus.h"

#include "gguf.h"
#include "log.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>

#define ORT_INF(fmt, ...) LOG_INF("orthrus: " fmt, __VA_ARGS__)
#define ORT_WRN(fmt, ...) LOG_WRN("orthrus: " fmt, __VA_ARGS__)
#define ORT_DBG(fmt, ...) LOG_DBG("orthrus: " fmt, __VA_ARGS__)

static constexpr const char * ORTHRUS_ARCH = "orthrus-qwen3";

// ---------------------------------------------------------------- settings from the GGUF

static int32_t orthrus_gguf_block_size(const std::string & path, std::string & arch) {
    gguf_init_params gp = { /* .no_alloc = */ true, /* .ctx = */ nullptr };
    gguf_context * g = gguf_init_from_file(path.c_str(), gp);
    if (g == nullptr) {
        return -1;
    }
    int32_t block = 0;
    const int64_t ka = gguf_find_key(g, "general.architecture");
    if (ka >= 0 && gguf_get_kv_type(g, ka) == GGUF_TYPE_STRING) {
        arch = gguf_get_val_str(g, ka);
    }
    const int64_t kb = gguf_find_key(g, (std::string(ORTHRUS_ARCH) + ".diffusion.block_size").c_str());
    if (arch == ORTHRUS_ARCH && kb >= 0 && gguf_get_kv_type(g, kb) == GGUF_TYPE_UINT32) {
        block = (int32_t) gguf_get_val_u32(g, kb);
    }
    gguf_free(g);
    return block;
}

bool common_orthrus_prepare(common_params & params) {
    auto & spec  = params.speculative;
    auto & types = spec.types;
    if (std::find(types.begin(), types.end(), COMMON_SPECULATIVE_TYPE_ORTHRUS) == types.end()) {
        return false;
    }
    auto disable = [&](const std::string & why) {
        ORT_WRN("%s: orthrus drafting is off\n", why.c_str());
        types.erase(std::remove(types.begin(), types.end(), COMMON_SPECULATIVE_TYPE_ORTHRUS), types.end());
        if (types.empty()) {
            types.push_back(COMMON_SPECULATIVE_TYPE_NONE);
        }
        return false;
    };
    std::string arch;
    const int32_t block = orthrus_gguf_block_size(params.model.path, arch);
    if (block < 0) {
        return disable("cannot read the GGUF metadata of '" + params.model.path + "'");
    }
    if (arch != ORTHRUS_ARCH) {
        return disable("the model is '" + arch + "', not " + ORTHRUS_ARCH + " (no diffusion view)");
    }
    if (block < 2) {
        return disable("the GGUF has no usable " + std::string(ORTHRUS_ARCH) + ".diffusion.block_size");
    }
    int32_t n_max = block - 1;
    if (spec.draft_n_max_set) {
        if (spec.draft.n_max > block - 1) {
            ORT_WRN("--spec-draft-n-max %d is more than block size - 1 = %d: using %d\n",
                    spec.draft.n_max, block - 1, block - 1);
        }
        n_max = std::min(spec.draft.n_max, block - 1);
    }
    if (n_max < 1) {
        return disable("draft length 0");
    }
    // a non-causal block cannot be split into ubatches
    if (params.n_ubatch < n_max + 1 || params.n_batch < n_max + 1) {
        ORT_WRN("n_ubatch %d / n_batch %d below the diffusion block %d: raising them\n",
                params.n_ubatch, params.n_batch, n_max + 1);
        params.n_ubatch = std::max(params.n_ubatch, n_max + 1);
        params.n_batch  = std::max(params.n_batch,  n_max + 1);
    }
    spec.draft.n_max = n_max;
    ORT_INF("self-drafting with the diffusion view: block size %d, up to %d drafts per step%s\n",
            block, n_max, spec.orthrus_auto ? ", length chosen per step (auto)" : "");
    return true;
}

// ---------------------------------------------------------------- the auto policy

// The policy itself lives in libllama (src/llama-orthrus-policy.cpp, llama_orthrus_policy_*),
// shared with the Python runtime's tests; the drafter only measures the costs it needs.

// ---------------------------------------------------------------- sampled drafts

// A distribution over the vocabulary with its mass on few tokens: (id, p) with p > 0.
using orthrus_dist = std::vector<llama_token_data>;

// Drafts are drawn from the chain applied to the highest logits of a diffusion row only.
// Speculative sampling is exact for any draft distribution q that is known, so this costs
// no exactness; it bounds the draft-side work (the chain on the whole vocabulary takes up
// to 9 ms per row on a 151,936-token vocabulary with top-k off, on the top 64 0.12 ms).
static constexpr int32_t ORTHRUS_DRAFT_CANDIDATES = 64;

// The distribution the sampler chain draws from on a row of logits: every sampler of the
// chain but the last (`dist`, which only draws) transforms the candidates, then softmax.
// Candidates: the whole vocabulary (n_top = 0), or the n_top highest logits.
static void orthrus_warp(llama_sampler * chain, const float * logits, int32_t n_vocab, orthrus_dist & out,
                         int32_t n_top = 0) {
    static thread_local std::vector<llama_token_data> cur;
    if (n_top > 0 && n_top < n_vocab) {
        // one pass with a min-heap of the n_top best so far
        auto worse = [](const llama_token_data & a, const llama_token_data & b) { return a.logit > b.logit; };
        cur.clear();
        for (llama_token id = 0; id < n_vocab; ++id) {
            if ((int32_t) cur.size() < n_top) {
                cur.push_back(llama_token_data{ id, logits[id], 0.0f });
                std::push_heap(cur.begin(), cur.end(), worse);
            } else if (logits[id] > cur.front().logit) {
                std::pop_heap(cur.begin(), cur.end(), worse);
                cur.back() = llama_token_data{ id, logits[id], 0.0f };
                std::push_heap(cur.begin(), cur.end(), worse);
            }
        }
    } else {
        cur.resize(n_vocab);
        for (llama_token id = 0; id < n_vocab; ++id) {
            cur[id] = llama_token_data{ id, logits[id], 0.0f };
        }
    }
    llama_token_data_array arr = { cur.data(), cur.size(), -1, false };
    const int32_t n = llama_sampler_chain_n(chain);
    for (int32_t i = 0; i + 1 < n; ++i) {
        llama_sampler_apply(llama_sampler_chain_get(chain, i), &arr);
    }
    float mx = -INFINITY;
    for (size_t i = 0; i < arr.size; ++i) {
        mx = std::max(mx, arr.data[i].logit);
    }
    out.clear();
    double sum = 0.0;
    for (size_t i = 0; i < arr.size; ++i) {
        const float l = arr.data[i].logit;
        if (std::isfinite(l)) {
            const double e = std::exp((double) l - mx);
            out.push_back(llama_token_data{ arr.data[i].id, l, (float) e });
            sum += e;
        }
    }
    for (auto & t : out) {
        t.p = (float) (t.p / sum);
    }
}

static llama_token orthrus_draw(const orthrus_dist & dist, std::mt19937 & rng) {
    double total = 0.0;
    for (const auto & t : dist) {
        total += t.p;
    }
    const double u = std::uniform_real_distribution<double>(0.0, total)(rng);
    double c = 0.0;
    for (const auto & t : dist) {
        c += t.p;
        if (u < c) {
            return t.id;
        }
    }
    return dist.back().id;
}

// Zero the entries of a dense row that the distribution set.
static void orthrus_clear(std::vector<float> & dense, const orthrus_dist & dist) {
    for (const auto & t : dist) {
        dense[t.id] = 0.0f;
    }
}

// A request's sampling state on one sequence.
struct orthrus_seq {
    common_sampler * smpl = nullptr; // the slot's sampler (not owned)
    llama_orthrus_policy * policy = nullptr; // auto_len: this sequence's length policy (owned)
    bool speculative = false;        // sampled drafts + speculative sampling apply
    std::mt19937 rng;
    int32_t last_drafted = 0;
    llama_tokens drafts;             // the last sampled draft ...
    std::vector<orthrus_dist> q;     // ... and the distribution each token was drawn from
};

// ---------------------------------------------------------------- the drafter

struct common_orthrus_drafter {
    llama_context * ctx = nullptr;
    int32_t n_max = 0;     // most drafts per step; block = n_max + 1
    bool auto_len = false;
    bool match = false;    // sampled requests: greedy drafts and token matching
    bool per_slot = false; // one diffusion forward per sequence (the old path, for comparison)
    int32_t n_min = 0;     // --spec-draft-n-min: drafts shorter than this are dropped
    float   p_min = 0.0f;  // --spec-draft-p-min: drafts end at a row whose top probability is lower
    bool equal_len = false; // the KV cache is not unified: a forward's blocks have one length
    std::vector<double> cost_draft, cost_verify; // per warm width (auto_len; empty until measured)
    std::vector<orthrus_seq> seqs;
    std::vector<llama_token> rows;     // argmax per block row
    std::vector<float> scratch;        // dense q of one row (verify); all zero between uses
    common_orthrus_stats stats;
};

common_orthrus_drafter * common_orthrus_init(llama_context * ctx, const common_params_speculative & params, uint32_t n_seq) {
    const int32_t n_max = params.draft.n_max;
    if (ctx == nullptr) {
        throw std::runtime_error("orthrus drafting needs the target context");
    }
    const llama_model * model = llama_get_model(ctx);
    const int32_t block = llama_model_orthrus_block_size(model);
    if (block < 2) {
        throw std::runtime_error("orthrus drafting needs an orthrus-qwen3 model");
    }
    if (n_max < 1 || n_max > block - 1) {
        throw std::runtime_error("orthrus draft length must be in [1, " + std::to_string(block - 1) +
                                 "], got " + std::to_string(n_max));
    }
    if ((uint32_t) n_max + 1 > llama_n_ubatch(ctx)) {
        throw std::runtime_error("orthrus: n_ubatch must hold the diffusion block of " + std::to_string(n_max + 1));
    }
    auto * d = new common_orthrus_drafter();
    d->ctx = ctx;
    d->n_max = n_max;
    d->auto_len = params.orthrus_auto;
    d->match = params.orthrus_match;
    d->per_slot = params.orthrus_per_slot;
    d->n_min = std::max(0, params.draft.n_min);
    d->p_min = params.draft.p_min;
    d->seqs.resize(n_seq);
    if (d->n_min > n_max) {
        ORT_WRN("--spec-draft-n-min %d is above the draft length %d: no step will draft\n", d->n_min, n_max);
    }
    d->scratch.assign(llama_vocab_n_tokens(llama_model_get_vocab(model)), 0.0f);
    return d;
}

void common_orthrus_free(common_orthrus_drafter * d) {
    if (d != nullptr) {
        for (auto & S : d->seqs) {
            llama_orthrus_policy_free(S.policy);
        }
    }
    delete d;
}

int32_t common_orthrus_n_max(const common_orthrus_drafter * d) {
    return d ? d->n_max : 0;
}

// The cost of each warm width, measured on the sequence being drafted (each pass leaves its
// cache as it was) with the policy's statistic: llama_orthrus_calibration_passes() passes, the
// first a warm-up, the fastest of the rest.
static void orthrus_calibrate(common_orthrus_drafter * d, llama_seq_id seq, llama_token t, llama_pos p) {
    const int32_t mb = d->n_max + 1;
    std::vector<int32_t> widths(llama_orthrus_warm_widths(mb, nullptr, 0));
    llama_orthrus_warm_widths(mb, widths.data(), (int32_t) widths.size());
    const int32_t passes = llama_orthrus_calibration_passes();
    std::vector<double> td, tv;
    std::vector<llama_token> toks(mb, t);
    llama_memory_t mem = llama_get_memory(d->ctx);
    for (int32_t w : widths) {
        std::vector<double> sd, sv;
        for (int rep = 0; rep < passes; ++rep) {
            const int64_t t0 = ggml_time_us();
            if (w >= 2 && llama_orthrus_draft(d->ctx, seq, t, p, w) != 0) {
                return;
            }
            const int64_t t1 = ggml_time_us();
            const int32_t rv = llama_orthrus_verify(d->ctx, seq, toks.data(), w, p);
            const int64_t t2 = ggml_time_us();
            llama_memory_seq_rm(mem, seq, p, -1);
            if (rv != 0) {
                return;
            }
            sd.push_back((t1 - t0) * 1e-6);
            sv.push_back((t2 - t1) * 1e-6);
        }
        td.push_back(w >= 2 ? llama_orthrus_calibration_cost(sd.data(), passes) : 0.0);
        tv.push_back(llama_orthrus_calibration_cost(sv.data(), passes));
    }
    d->cost_draft  = td;
    d->cost_verify = tv;
    std::string s;
    for (size_t i = 0; i < widths.size(); ++i) {
        s += string_format(" %d:%.2f/%.2f", (int) widths[i], td[i] * 1e3, tv[i] * 1e3);
    }
    ORT_INF("auto: measured width:draft/verify ms%s\n", s.c_str());
}

void common_orthrus_set_sampler(common_orthrus_drafter * d, llama_seq_id seq, common_sampler * smpl,
                                const common_params_sampling & params) {
    if (d == nullptr || seq < 0 || (size_t) seq >= d->seqs.size()) {
        return;
    }
    auto & S = d->seqs[seq];
    llama_orthrus_policy * policy = S.policy; // the length policy outlives the request
    S = orthrus_seq();
    S.policy = policy;
    S.smpl = smpl;
    if (smpl == nullptr || d->match || params.temp <= 0.0f || params.mirostat != 0 ||
        common_sampler_has_constraints(smpl)) {
        return; // greedy drafts; the verify keeps them by token matching
    }
    llama_sampler * chain = common_sampler_get(smpl);
    const int32_t n = llama_sampler_chain_n(chain);
    if (n < 1 || std::strcmp(llama_sampler_name(llama_sampler_chain_get(chain, n - 1)), "dist") != 0) {
        return; // the last sampler is not a plain draw (adaptive-p): no closed-form p
    }
    S.speculative = true;
    S.rng.seed(common_sampler_get_seed(smpl) ^ 0x6f727468u); // "orth": not the dist sampler's stream
}

// Draw drafts from q, the slot's chain on each diffusion row; a clone of the sampler sees
// the drafts so far, as the slot's sampler will see them when the verify accepts them.
static void orthrus_sample_drafts(common_orthrus_drafter * d, orthrus_seq & S, int32_t row0, int32_t n) {
    const llama_vocab * vocab = llama_model_get_vocab(llama_get_model(d->ctx));
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    common_sampler * clone = common_sampler_clone(S.smpl);
    llama_sampler * chain = common_sampler_get(clone);
    S.q.resize(n);
    S.drafts.clear();
    for (int32_t i = 0; i < n; ++i) {
        orthrus_warp(chain, llama_get_logits_ith(d->ctx, row0 + i), n_vocab, S.q[i], ORTHRUS_DRAFT_CANDIDATES);
        if (S.q[i].empty()) {
            break;
        }
        const llama_token t = orthrus_draw(S.q[i], S.rng);
        S.drafts.push_back(t);
        if (llama_vocab_is_eog(vocab, t)) {
            break; // nothing follows an end of generation
        }
        common_sampler_accept(clone, t, true);
    }
    S.q.resize(S.drafts.size());
    common_sampler_free(clone);
}

// The block length of one request (< 2: no draft this step).
static int32_t orthrus_block_of(common_orthrus_drafter * d, const common_orthrus_draft_request & r) {
    int32_t n = d->n_max;
    if (r.n_max >= 0) {
        n = std::min(n, r.n_max);
    }
    if (n < 1 || n < d->n_min) {
        return 0;
    }
    int32_t block = n + 1;
    if (!d->auto_len) {
        return block;
    }
    if (d->cost_draft.empty()) {
        if ((int64_t) r.pos0 + d->n_max + 1 > (int64_t) llama_n_ctx_seq(d->ctx)) {
            return 0; // no room after this position for the widest pass: a plain step, calibrate later
        }
        orthrus_calibrate(d, r.seq, r.id_last, r.pos0);
        if (d->cost_draft.empty()) {
            ORT_WRN("%s", "auto: calibration failed, drafting the full length\n");
            d->auto_len = false;
            return block;
        }
    }
    auto & S = d->seqs[r.seq];
    if (S.policy == nullptr) {
        S.policy = llama_orthrus_policy_init(d->n_max + 1, d->cost_draft.data(), d->cost_verify.data());
        if (S.policy == nullptr) {
            return block;
        }
    }
    block = llama_orthrus_policy_choose(S.policy, block);
    if (block < 2 || block - 1 < d->n_min) {
        llama_orthrus_policy_update(S.policy, 0, 0); // a plain step: counts towards the next probe
        return 0;
    }
    return block;
}

// The softmax probability of the most likely token of a row of logits.
static float orthrus_top_prob(const float * row, int32_t n_vocab) {
    float mx = row[0];
    for (int32_t j = 1; j < n_vocab; ++j) {
        mx = std::max(mx, row[j]);
    }
    double sum = 0.0;
    for (int32_t j = 0; j < n_vocab; ++j) {
        sum += std::exp((double) row[j] - mx);
    }
    return (float) (1.0 / sum);
}

// How many of the n drafts from rows row0.. to keep: up to the first row whose top
// probability is below p_min (upstream's --spec-draft-p-min), and none if fewer than n_min.
static int32_t orthrus_keep(const common_orthrus_drafter * d, int32_t row0, int32_t n) {
    if (d->p_min > 0.0f) {
        const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(d->ctx)));
        for (int32_t k = 0; k < n; ++k) {
            if (orthrus_top_prob(llama_get_logits_ith(d->ctx, row0 + k), n_vocab) < d->p_min) {
                n = k;
                break;
            }
        }
    }
    return n < d->n_min ? 0 : n;
}

// One diffusion forward for the requests r[i] of `group` (width[i] tokens each, padded with
// masks beyond blocks[i] where the forward needs one length), then the blocks[i] - 1 drafts
// of each from its first rows. Returns the llama_orthrus_draft_seqs status.
static int32_t orthrus_draft_group(common_orthrus_drafter * d, const std::vector<common_orthrus_draft_request> & reqs,
                                   const std::vector<size_t> & group, const std::vector<int32_t> & width,
                                   const std::vector<int32_t> & blocks) {
    std::vector<llama_seq_id> seqs;
    std::vector<llama_token>  ts;
    std::vector<llama_pos>    ps;
    std::vector<int32_t>      ns;
    int32_t n_rows = 0;
    for (size_t i : group) {
        seqs.push_back(reqs[i].seq);
        ts.push_back(reqs[i].id_last);
        ps.push_back(reqs[i].pos0);
        ns.push_back(width[i]);
        n_rows += width[i];
    }
    const int32_t rc = llama_orthrus_draft_seqs(d->ctx, (int32_t) group.size(), seqs.data(), ts.data(), ps.data(), ns.data());
    if (rc != 0) {
        return rc;
    }
    d->stats.n_forwards += 1;
    d->stats.n_blocks   += (int64_t) group.size();
    bool have_argmax = false;
    int32_t row0 = 0;
    for (size_t i : group) {
        const auto & r = reqs[i];
        auto & S = d->seqs[r.seq];
        // row row0 + k - 1 predicts position pos0 + k: drafts d1..dn from rows row0..row0+n-1
        const int32_t n = orthrus_keep(d, row0, blocks[i] - 1);
        if (n == 0) {
            // nothing kept: the step is a plain decode
        } else if (S.speculative) {
            orthrus_sample_drafts(d, S, row0, n);
            if ((int32_t) S.drafts.size() < d->n_min) {
                S.drafts.clear(); // ended early at an end of generation
                S.q.clear();
            }
            r.result->insert(r.result->end(), S.drafts.begin(), S.drafts.end());
            S.last_drafted = (int32_t) S.drafts.size();
        } else {
            if (!have_argmax) {
                d->rows.resize(n_rows);
                if (llama_orthrus_argmax(d->ctx, n_rows, d->rows.data()) != 0) {
                    return LLAMA_ORTHRUS_ERR_ROWS;
                }
                have_argmax = true;
            }
            r.result->insert(r.result->end(), d->rows.begin() + row0, d->rows.begin() + row0 + n);
            S.last_drafted = n;
        }
        row0 += width[i];
    }
    return 0;
}

void common_orthrus_draft_all(common_orthrus_drafter * d, const std::vector<common_orthrus_draft_request> & reqs) {
    std::vector<int32_t> blocks(reqs.size(), 0);
    std::vector<size_t> todo;
    for (size_t i = 0; i < reqs.size(); ++i) {
        const auto & r = reqs[i];
        if (r.seq < 0 || (size_t) r.seq >= d->seqs.size() || r.result == nullptr) {
            continue;
        }
        auto & S = d->seqs[r.seq];
        S.last_drafted = 0;
        S.drafts.clear();
        blocks[i] = orthrus_block_of(d, r);
        if (blocks[i] >= 2) {
            todo.push_back(i);
        }
    }
    if (todo.empty()) {
        return; // a plain decode pays more than a draft now
    }
    d->stats.n_steps += 1;
    // the requests in order, as few forwards as n_ubatch allows. Without a unified KV cache
    // a forward's blocks share one length (llama_decode would cut unequal ones): shorter
    // blocks are padded with masks to the longest (their extra rows are not used; on a GPU
    // the width is nearly free), where the longer block still fits their context.
    const int32_t cap = (int32_t) llama_n_ubatch(d->ctx);
    const int64_t n_ctx_seq = (int64_t) llama_n_ctx_seq(d->ctx);
    std::vector<int32_t> width(reqs.size(), 0);
    std::vector<bool> done(reqs.size(), false);
    size_t a = 0;
    while (a < todo.size()) {
        if (done[todo[a]]) {
            ++a;
            continue;
        }
        std::vector<size_t> group = {todo[a]};
        int32_t n_tok = blocks[todo[a]];
        int32_t len = blocks[todo[a]];
        done[todo[a]] = true;
        for (size_t b = a + 1; b < todo.size() && !d->per_slot; ++b) {
            const size_t i = todo[b];
            if (done[i]) {
                continue;
            }
            if (!d->equal_len) {
                if (n_tok + blocks[i] > cap) {
                    continue;
                }
                n_tok += blocks[i];
            } else {
                const int32_t len2 = std::max(len, blocks[i]);
                bool fits = (int64_t) (group.size() + 1) * len2 <= cap && reqs[i].pos0 + len2 <= n_ctx_seq;
                for (size_t k = 0; k < group.size() && fits; ++k) {
                    fits = reqs[group[k]].pos0 + len2 <= n_ctx_seq;
                }
                if (!fits) {
                    continue;
                }
                len = len2;
            }
            group.push_back(i);
            done[i] = true;
        }
        for (size_t i : group) {
            width[i] = d->equal_len ? len : blocks[i];
        }
        int32_t rc = orthrus_draft_group(d, reqs, group, width, blocks);
        if (rc == LLAMA_ORTHRUS_ERR_SPLIT && !d->equal_len) {
            // one KV stream per sequence: from now on one length per forward
            d->equal_len = true;
            ORT_DBG("%s", "the KV cache is not unified: blocks of one length per forward\n");
            for (size_t k : group) {
                done[k] = false;
            }
            continue; // the same requests again, regrouped
        }
        if (rc != 0) {
            ORT_DBG("draft of %zu sequences failed: %s\n", group.size(), llama_orthrus_strerror(rc));
        }
        ++a;
    }
}

void common_orthrus_get_stats(const common_orthrus_drafter * d, common_orthrus_stats & out) {
    out = d ? d->stats : common_orthrus_stats();
}

std::vector<llama_token> common_orthrus_sample_and_accept_n(common_orthrus_drafter * d, llama_seq_id seq,
                                                            common_sampler * smpl, llama_context * ctx,
                                                            const std::vector<int> & idxs,
                                                            const llama_tokens & draft) {
    const bool sampled = d != nullptr && seq >= 0 && (size_t) seq < d->seqs.size() &&
                         d->seqs[seq].speculative && d->seqs[seq].smpl == smpl &&
                         !draft.empty() && draft.size() <= d->seqs[seq].drafts.size() &&
                         std::equal(draft.begin(), draft.end(), d->seqs[seq].drafts.begin()) &&
                         idxs.size() == draft.size() + 1;
    if (!sampled) {
        return common_sampler_sample_and_accept_n(smpl, ctx, idxs, draft);
    }
    auto & S = d->seqs[seq];
    const llama_vocab * vocab = llama_model_get_vocab(llama_get_model(ctx));
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    llama_sampler * chain = common_sampler_get(smpl);
    std::vector<llama_token> result;
    orthrus_dist p;
    llama_synchronize(ctx);
    for (size_t i = 0; i < draft.size(); ++i) {
        orthrus_warp(chain, llama_get_logits_ith(ctx, idxs[i]), n_vocab, p);
        const orthrus_dist & q = S.q[i];
        for (const auto & t : q) {
            d->scratch[t.id] = t.p;
        }
        double p_d = 0.0;
        for (const auto & t : p) {
            if (t.id == draft[i]) {
                p_d = t.p;
            }
        }
        const double q_d = d->scratch[draft[i]];
        const double u = std::uniform_real_distribution<double>(0.0, 1.0)(S.rng);
        if (u * q_d < p_d) { // keep draft i with probability min(1, p/q)
            orthrus_clear(d->scratch, q);
            result.push_back(draft[i]);
            common_sampler_accept(smpl, draft[i], true);
            if (llama_vocab_is_eog(vocab, draft[i])) {
                return result; // the end of generation is the step's last token
            }
            continue;
        }
        // rejected: draw from the residual max(0, p - q), or from p if it has no mass
        orthrus_dist res;
        for (const auto & t : p) {
            const float r = t.p - d->scratch[t.id];
            if (r > 0.0f) {
                res.push_back(llama_token_data{ t.id, t.logit, r });
            }
        }
        orthrus_clear(d->scratch, q);
        double mass = 0.0;
        for (const auto & t : res) {
            mass += t.p;
        }
        const llama_token x = orthrus_draw(mass > 1e-9 ? res : p, S.rng);
        result.push_back(x);
        common_sampler_accept(smpl, x, true);
        return result;
    }
    // every draft kept: the bonus token is a plain draw from the last row
    const llama_token x = common_sampler_sample(smpl, ctx, idxs[draft.size()]);
    common_sampler_accept(smpl, x, true);
    result.push_back(x);
    return result;
}

void common_orthrus_accept(common_orthrus_drafter * d, llama_seq_id seq, int32_t n_accepted) {
    if (seq < 0 || (size_t) seq >= d->seqs.size()) {
        return;
    }
    auto & S = d->seqs[seq];
    const int32_t drafted = S.last_drafted;
    if (d->auto_len && S.policy != nullptr && drafted > 0) {
        llama_orthrus_policy_update(S.policy, drafted, std::min(n_accepted, drafted));
    }
    S.last_drafted = 0;
}
