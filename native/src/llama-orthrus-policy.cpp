// orthrus-gguf: the auto draft length, the C++ copy of orthrus_gguf/policy.py (read that
// file's docstring for the model). Both copies are checked against the same test vectors
// (tests/data/policy_vectors.json) and against each other on random histories.
//
// A step with block b costs draft(b) + verify(b) and emits E(b) = 1 + sum_{i<b} prod_{j<=i} a_j
// tokens; a plain AR step costs verify(1) for one token. The choice is the warm width <= limit
// with the best E(b) / cost(b); while AR wins, a short probe follows 16, 32, ... 512 AR
// steps, if a probe could change the choice (some width beats AR with the probe's drafts
// always accepted and the later ones as estimated); else, and where no width could pay even
// with every draft accepted, it is always AR.

#include "llama.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int32_t ORTHRUS_PROBE_MIN   = 16;
constexpr int32_t ORTHRUS_PROBE_MAX   = 512;
constexpr int32_t ORTHRUS_PROBE_WIDTH = 4;
constexpr double  ORTHRUS_DECAY       = 0.98;

std::vector<int32_t> orthrus_warm_widths(int32_t max_block) {
    std::vector<int32_t> ws = { 1 };
    for (int32_t w = 2; w < max_block; w *= 2) {
        ws.push_back(w);
    }
    if (max_block > 1) {
        ws.push_back(max_block);
    }
    return ws;
}

} // namespace

struct llama_orthrus_policy {
    int32_t max_block = 0;
    std::vector<int32_t> widths;
    std::vector<double>  cost;       // draft + verify seconds, by warm width
    std::vector<double>  hit, miss;  // Beta counts by draft index 1..max_block-1
    std::vector<double>  rates;      // expected tokens per second, by warm width
    bool    pays        = false;
    bool    probe_helps = false;      // could a probe make a width beat AR (policy.py's probe_helps)
    bool    stale       = true;       // rates and probe_helps
    int32_t since_probe = 0;
    int32_t probe_every = ORTHRUS_PROBE_MIN;

    // the rate of each warm width, with drafts 1..n_sure always accepted and the others as
    // estimated: E(b) for b = 1..max_block (summed in the order of policy.py's
    // cumprod/cumsum, so both round alike), then E / cost
    std::vector<double> rates_of(int32_t n_sure) const {
        std::vector<double> expected(max_block + 1, 1.0);
        double run = 1.0, sum = 0.0;
        for (int32_t b = 2; b <= max_block; ++b) {
            run *= b - 1 <= n_sure ? 1.0 : hit[b - 1] / (hit[b - 1] + miss[b - 1]);
            sum += run;
            expected[b] = 1.0 + sum;
        }
        std::vector<double> r(widths.size());
        for (size_t i = 0; i < widths.size(); ++i) {
            r[i] = expected[widths[i]] / cost[i];
        }
        return r;
    }

    void refresh() {
        if (!stale) {
            return;
        }
        rates = rates_of(0);
        const std::vector<double> sure = rates_of(probe_width(max_block) - 1);
        probe_helps = false;
        for (size_t i = 1; i < sure.size(); ++i) {
            probe_helps = probe_helps || sure[i] > sure[0];
        }
        stale = false;
    }

    int32_t best(int32_t limit) {
        refresh();
        size_t k = 0; // ties: the narrower width
        for (size_t i = 1; i < widths.size() && widths[i] <= limit; ++i) {
            if (rates[i] > rates[k]) {
                k = i;
            }
        }
        return widths[k];
    }

    int32_t probe_width(int32_t limit) const {
        const int32_t cap = std::max(2, std::min(limit, ORTHRUS_PROBE_WIDTH));
        int32_t w = 1;
        for (int32_t x : widths) {
            if (x <= cap) {
                w = x;
            }
        }
        return w;
    }
};

extern "C" {

int32_t llama_orthrus_warm_widths(int32_t max_block, int32_t * out, int32_t n_max) {
    if (max_block < 1) {
        return LLAMA_ORTHRUS_ERR_ARG;
    }
    const auto ws = orthrus_warm_widths(max_block);
    for (int32_t i = 0; out != nullptr && i < n_max && i < (int32_t) ws.size(); ++i) {
        out[i] = ws[i];
    }
    return (int32_t) ws.size();
}

int32_t llama_orthrus_calibration_passes(void) {
    return LLAMA_ORTHRUS_CALIBRATION_PASSES;
}

double llama_orthrus_calibration_cost(const double * samples, int32_t n) {
    if (samples == nullptr || n < 2) {
        return -1.0;
    }
    return *std::min_element(samples + 1, samples + n); // the first pass is a warm-up
}

llama_orthrus_policy * llama_orthrus_policy_init(int32_t max_block, const double * cost_draft, const double * cost_verify) {
    if (max_block < 1 || max_block > 4096 || cost_draft == nullptr || cost_verify == nullptr) {
        return nullptr;
    }
    auto * p = new llama_orthrus_policy();
    p->max_block = max_block;
    p->widths    = orthrus_warm_widths(max_block);
    for (size_t i = 0; i < p->widths.size(); ++i) {
        p->cost.push_back(cost_verify[i] + (p->widths[i] > 1 ? cost_draft[i] : 0.0));
    }
    for (size_t i = 1; i < p->widths.size(); ++i) {
        p->pays = p->pays || p->cost[i] < p->widths[i] * p->cost[0];
    }
    p->hit.assign(max_block, 1.0);
    p->miss.assign(max_block, 1.0);
    return p;
}

void llama_orthrus_policy_free(llama_orthrus_policy * p) {
    delete p;
}

int32_t llama_orthrus_policy_choose(llama_orthrus_policy * p, int32_t limit) {
    if (p == nullptr || !p->pays || limit < 2) {
        return 1;
    }
    const int32_t b = p->best(limit);
    if (b == 1 && p->since_probe >= p->probe_every && p->probe_helps) { // best() refreshed it
        return p->probe_width(limit); // refresh the acceptance estimate cheaply
    }
    return b;
}

void llama_orthrus_policy_update(llama_orthrus_policy * p, int32_t drafted, int32_t accepted) {
    if (p == nullptr) {
        return;
    }
    if (drafted <= 0) { // a plain AR step says nothing about acceptance
        p->since_probe++;
        return;
    }
    accepted = std::max(0, std::min(accepted, drafted));
    // a draft after probe_every AR steps was a probe: the next waits twice as long; any
    // other draft means drafting pays, and probing starts afresh when it stops paying
    const bool probe = p->since_probe >= p->probe_every;
    p->probe_every = probe ? std::min(2 * p->probe_every, ORTHRUS_PROBE_MAX) : ORTHRUS_PROBE_MIN;
    p->since_probe = 0;
    p->stale = true;
    for (int32_t j = 0; j < p->max_block; ++j) {
        p->hit[j]  *= ORTHRUS_DECAY; // old evidence fades: acceptance changes with the text
        p->miss[j] *= ORTHRUS_DECAY;
    }
    for (int32_t j = 1; j <= accepted && j < p->max_block; ++j) {
        p->hit[j] += 1.0;
    }
    if (accepted < drafted && accepted + 1 < p->max_block) {
        p->miss[accepted + 1] += 1.0;
    }
}

} // extern "C"
