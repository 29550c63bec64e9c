// Greedy decoding from token ids with llama.cpp, for benchmarks/llamacpp_side_by_side.py.
//
//     greedy_ids MODEL.gguf N_NEW THREADS < prompts.txt
//
// stdin: one prompt a line, as space-separated token ids (already formatted with the chat
// template, no BOS added here, exactly the ids PyTorch and edgekd's bundles are given).
// stdout: one line a prompt: the greedy token ids (the end-of-generation token ends it),
// then a tab and the decode time of those tokens in seconds (the prompt's prefill excluded).
// stderr, at the end: the process's peak resident memory, the VmHWM line of /proc/self/status.
#include "llama.h"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.gguf N_NEW THREADS < prompts.txt\n", argv[0]);
        return 2;
    }
    const int n_new = std::stoi(argv[2]);
    const int threads = std::stoi(argv[3]);
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 2048;
    cp.n_batch = 2048;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }
    std::string line;
    while (std::getline(std::cin, line)) {
        std::vector<llama_token> ids;
        std::istringstream in(line);
        for (long v; in >> v;) ids.push_back((llama_token) v);
        if (ids.empty()) { printf("\t0\n"); continue; }
        llama_memory_clear(llama_get_memory(ctx), true);
        if (llama_decode(ctx, llama_batch_get_one(ids.data(), (int32_t) ids.size())) != 0) {
            fprintf(stderr, "prefill failed\n"); return 1;
        }
        std::vector<llama_token> out;
        double seconds = 0;
        for (int i = 0; i < n_new; i++) {
            const float * logits = llama_get_logits_ith(ctx, -1);
            llama_token best = 0;
            for (llama_token t = 1; t < n_vocab; t++) if (logits[t] > logits[best]) best = t;
            out.push_back(best);
            if (llama_vocab_is_eog(vocab, best) || i + 1 == n_new) break;
            auto t0 = std::chrono::steady_clock::now();
            if (llama_decode(ctx, llama_batch_get_one(&best, 1)) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
            seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
        for (size_t i = 0; i < out.size(); i++) printf(i ? " %d" : "%d", out[i]);
        printf("\t%.6f\n", seconds);
        fflush(stdout);
    }
    llama_free(ctx);
    llama_model_free(model);
    std::ifstream status("/proc/self/status");
    for (std::string s; std::getline(status, s);) if (s.rfind("VmHWM:", 0) == 0) fprintf(stderr, "%s\n", s.c_str());
    return 0;
}
