// orthrus-gguf: self-drafting with the diffusion view of an orthrus-qwen3 target.
// See speculative-orthrus.h; the loop and the policy follow orthrus_gguf/decode.py and
// orthrus_gguf/policy.py of the Python runtime.

#include "speculative-orthrus.h"

#include "gguf.h"
#include "log.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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

// A step with block b costs draft(b) + verify(b) and emits E(b) = 1 + sum_{i<b} prod_{j<=i} a_j
// tokens (a_j: running probability that draft j is accepted given drafts 1..j-1 were); a
// plain step costs verify(1) for 1 token. Take the b with the best tokens per second, b = 1
// (no draft) included, and probe a short draft now and then while not drafting.
struct orthrus_auto_policy {
    static constexpr int    PROBE_MIN = 16;
    static constexpr int    PROBE_MAX = 512;
    static constexpr double DECAY     = 0.98;

    int32_t max_block = 0;
    std::vector<double> cd, cv;      // seconds by width 0..max_block
    std::vector<double> hit, miss;   // Beta counts by draft index 1..max_block-1
    int since_probe = 0, probe_every = PROBE_MIN;

    void init(int32_t mb, const std::vector<double> & draft, const std::vector<double> & verify) {
        max_block = mb;
        cd = draft;
        cv = verify;
        hit.assign(mb, 1.0);
        miss.assign(mb, 1.0);
    }

    int32_t choose(int32_t limit) {
        limit = std::min(limit, max_block);
        int32_t best = 1;
        double best_rate = 1.0 / cv[1];
        double expected = 1.0, run = 1.0;
        for (int32_t b = 2; b <= limit; ++b) {
            run *= hit[b - 1] / (hit[b - 1] + miss[b - 1]);
            expected += run;
            const double rate = expected / (cv[b] + cd[b]);
            if (rate > best_rate) {
                best_rate = rate;
                best = b;
            }
        }
        if (best == 1 && limit >= 2) {
            if (++since_probe >= probe_every) { // keep the acceptance estimate fresh, cheaply
                since_probe = 0;
                probe_every = std::min(2 * probe_every, PROBE_MAX);
                return std::min(4, limit);
            }
        }
        return best;
    }

    void update(int32_t drafted, int32_t accepted) {
        for (int32_t j = 0; j < max_block; ++j) {
            hit[j]  *= DECAY; // old evidence fades: acceptance changes with the text
            miss[j] *= DECAY;
        }
        for (int32_t j = 1; j <= accepted && j < max_block; ++j) {
            hit[j] += 1.0;
        }
        if (accepted < drafted && accepted + 1 < max_block) {
            miss[accepted + 1] += 1.0;
        }
    }
};

// ---------------------------------------------------------------- the drafter

struct common_orthrus_drafter {
    llama_context * ctx = nullptr;
    int32_t n_max = 0;     // most drafts per step; block = n_max + 1
    bool auto_len = false;
    bool calibrated = false;
    orthrus_auto_policy policy;
    std::vector<int32_t> last_drafted; // per seq
    std::vector<llama_token> rows;     // argmax per block row
};

common_orthrus_drafter * common_orthrus_init(llama_context * ctx, int32_t n_max, bool auto_len, uint32_t n_seq) {
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
    d->auto_len = auto_len;
    d->last_drafted.assign(n_seq, 0);
    return d;
}

void common_orthrus_free(common_orthrus_drafter * d) {
    delete d;
}

int32_t common_orthrus_n_max(const common_orthrus_drafter * d) {
    return d ? d->n_max : 0;
}

// The fastest of two timed passes per width after a warm-up, taken on the sequence being
// drafted (each pass leaves its cache as it was).
static void orthrus_calibrate(common_orthrus_drafter * d, llama_seq_id seq, llama_token t, llama_pos p) {
    const int32_t mb = d->n_max + 1;
    std::vector<int32_t> widths;
    for (int32_t w = 1; w < mb; w *= 2) {
        widths.push_back(w);
    }
    widths.push_back(mb);
    std::vector<double> wd, td, tv;
    std::vector<llama_token> toks(mb, t);
    llama_memory_t mem = llama_get_memory(d->ctx);
    for (int32_t w : widths) {
        double best_d = 1e30, best_v = 1e30;
        for (int rep = 0; rep < 3; ++rep) {
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
            if (rep > 0) {
                best_d = std::min(best_d, (t1 - t0) * 1e-6);
                best_v = std::min(best_v, (t2 - t1) * 1e-6);
            }
        }
        wd.push_back(w);
        td.push_back(w >= 2 ? best_d : 0.0);
        tv.push_back(best_v);
    }
    // piecewise-linear in the width between the measured ones
    std::vector<double> cd(mb + 1, 0.0), cv(mb + 1, 0.0);
    for (int32_t w = 1; w <= mb; ++w) {
        size_t k = 0;
        while (k + 1 < wd.size() && wd[k + 1] < w) {
            ++k;
        }
        const size_t k1 = std::min(k + 1, wd.size() - 1);
        const double f = k1 == k ? 0.0 : (w - wd[k]) / (wd[k1] - wd[k]);
        cd[w] = td[k] + f * (td[k1] - td[k]);
        cv[w] = tv[k] + f * (tv[k1] - tv[k]);
    }
    cd[1] = 0.0;
    d->policy.init(mb, cd, cv);
    d->calibrated = true;
    std::string s;
    for (size_t i = 0; i < wd.size(); ++i) {
        s += string_format(" %d:%.2f/%.2f", (int) wd[i], td[i] * 1e3, tv[i] * 1e3);
    }
    ORT_INF("auto: measured width:draft/verify ms%s\n", s.c_str());
}

void common_orthrus_draft(common_orthrus_drafter * d, llama_seq_id seq, llama_token id_last,
                          llama_pos pos0, int32_t n_max, std::vector<llama_token> & result) {
    if (seq < 0 || (size_t) seq >= d->last_drafted.size()) {
        return;
    }
    d->last_drafted[seq] = 0;
    int32_t n = d->n_max;
    if (n_max >= 0) {
        n = std::min(n, n_max);
    }
    if (n < 1) {
        return;
    }
    int32_t block = n + 1;
    if (d->auto_len) {
        if (!d->calibrated) {
            orthrus_calibrate(d, seq, id_last, pos0);
            if (!d->calibrated) {
                ORT_WRN("%s", "auto: calibration failed, drafting the full length\n");
                d->auto_len = false;
            }
        }
        if (d->auto_len) {
            block = d->policy.choose(block);
        }
    }
    if (block < 2) {
        return; // a plain decode pays more than a draft now
    }
    const int32_t rc = llama_orthrus_draft(d->ctx, seq, id_last, pos0, block);
    if (rc != 0) {
        ORT_DBG("draft of %d at pos %d of seq %d failed: %s\n", block, pos0, seq, llama_orthrus_strerror(rc));
        return;
    }
    // row i-1 predicts position pos0 + i: drafts d1..d(block-1) from rows 0..block-2
    d->rows.resize(block - 1);
    if (llama_orthrus_argmax(d->ctx, block - 1, d->rows.data()) != 0) {
        return;
    }
    result.insert(result.end(), d->rows.begin(), d->rows.end());
    d->last_drafted[seq] = block - 1;
}

void common_orthrus_accept(common_orthrus_drafter * d, llama_seq_id seq, int32_t n_accepted) {
    if (seq < 0 || (size_t) seq >= d->last_drafted.size()) {
        return;
    }
    const int32_t drafted = d->last_drafted[seq];
    if (d->auto_len && d->calibrated && drafted > 0) {
        d->policy.update(drafted, std::min(n_accepted, drafted));
    }
    d->last_drafted[seq] = 0;
}
