// How long llama-server's default sampler chain (all but the final draw) takes on one row of
// 151,936 logits, on the whole vocabulary or on the K highest logits (what the orthrus drafter
// does for drafts). Needs any GGUF with that vocabulary (it loads the vocabulary only). Build
// against a llama.cpp tree T with the patches applied and built in T/build:
//   g++ -O2 -std=c++17 -IT/include -IT/common -IT/ggml/include sampler_chain_cost.cpp -o scc \
//       -LT/build/bin -lllama-common -lllama -lggml -lggml-base -Wl,-rpath,T/build/bin
//   ./scc model.gguf TOP_K [K]      # TOP_K: the request's top-k (0 = off)
// Measured on the 2-core CPU (one thread): top-k 40: 0.12 ms; top-k 0: 9.1 ms; top-k 0 on the
// 64 highest: 0.12 ms; top-k 0 on the 256 highest: 0.15 ms per row.
#include "llama.h"
#include "sampling.h"
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <random>
#include <vector>
int main(int argc, char ** argv) {
    llama_backend_init();
    auto mp = llama_model_default_params();
    mp.vocab_only = true;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    common_params_sampling sp;
    sp.temp = 0.7f;
    if (argc > 2) sp.top_k = atoi(argv[2]);
    common_sampler * s = common_sampler_init(model, sp);
    llama_sampler * chain = common_sampler_get(s);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.0f, 3.0f);
    std::vector<float> logits(n_vocab);
    for (auto & x : logits) x = nd(rng);
    std::vector<llama_token_data> cur(n_vocab);
    const int reps = 200;
    auto t0 = std::chrono::steady_clock::now();
    size_t kept = 0;
    for (int r = 0; r < reps; ++r) {
        if (argc > 3) {
            const int K = atoi(argv[3]);
            cur.clear();
            auto cmp = [](const llama_token_data & a, const llama_token_data & b) { return a.logit > b.logit; };
            for (int id = 0; id < n_vocab; ++id) {
                const float l = logits[id];
                if ((int) cur.size() < K) { cur.push_back({id, l, 0.0f}); std::push_heap(cur.begin(), cur.end(), cmp); }
                else if (l > cur.front().logit) { std::pop_heap(cur.begin(), cur.end(), cmp); cur.back() = {id, l, 0.0f}; std::push_heap(cur.begin(), cur.end(), cmp); }
            }
        } else {
            cur.resize(n_vocab);
            for (int i = 0; i < n_vocab; ++i) cur[i] = {i, logits[i], 0.0f};
        }
        llama_token_data_array arr = {cur.data(), cur.size(), -1, false};
        const int n = llama_sampler_chain_n(chain);
        for (int i = 0; i + 1 < n; ++i) llama_sampler_apply(llama_sampler_chain_get(chain, i), &arr);
        kept += arr.size;
    }
    auto t1 = std::chrono::steady_clock::now();
    printf("n_vocab %d, chain %s\n%.3f ms per row (mean kept %.1f)\n", n_vocab, common_sampler_print(s).c_str(),
           std::chrono::duration<double, std::milli>(t1 - t0).count() / reps, (double) kept / reps);
}
