// Reference outputs from llama.cpp (built from the llama-cpp-python sdist by scripts/build-llamacpp)
// for berth's agreement check: for each line of token ids on stdin, the top-1 token and its
// log-probability at every position with the line fed as one prompt (teacher forcing), and the
// first N tokens of greedy generation after it. One JSON object per line on stdout.
//
//     llamacpp_golden MODEL.gguf THREADS GREEDY_TOKENS < prompts.txt > golden.jsonl
//
// Flash attention and repacked weights are off: berth reproduces llama.cpp's plain CPU path.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static int argmax(const float * logits, int n, double * logprob) {
    int best = 0;
    for (int i = 1; i < n; i++) {
        if (logits[i] > logits[best]) best = i;
    }
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += exp((double) logits[i] - logits[best]);
    *logprob = -log(sum);
    return best;
}

static int decode(struct llama_context * ctx, const llama_token * tokens, int n, int start, int all_logits) {
    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = start + i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = all_logits || i == n - 1;
    }
    batch.n_tokens = n;
    int rc = llama_decode(ctx, batch);
    llama_batch_free(batch);
    return rc;
}

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.gguf THREADS GREEDY_TOKENS < prompts.txt\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[2]);
    int greedy = atoi(argv[3]);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    // No repacked weight layouts (AMX, AVX-512 tiles): the plain CPU kernels, which berth follows
    // (and AMX faults where the kernel has not enabled its tile state).
    mp.use_extra_bufts = false;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 0; // the model's own context, as berth serves it
    cp.n_batch = 1024;
    cp.n_ubatch = 1024;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    static char line[1 << 20];
    llama_token * tokens = malloc(sizeof(llama_token) * (1 << 16));
    while (fgets(line, sizeof line, stdin)) {
        int n = 0;
        for (char * p = strtok(line, " \n"); p && n < (1 << 16); p = strtok(NULL, " \n")) tokens[n++] = atoi(p);
        if (n == 0) continue;
        llama_memory_clear(llama_get_memory(ctx), true);
        if (decode(ctx, tokens, n, 0, 1)) {
            fprintf(stderr, "decode failed\n");
            return 1;
        }
        printf("{\"top1\":[");
        double * lps = malloc(sizeof(double) * n);
        for (int i = 0; i < n; i++) printf("%s%d", i ? "," : "", argmax(llama_get_logits_ith(ctx, i), n_vocab, &lps[i]));
        printf("],\"logprob\":[");
        for (int i = 0; i < n; i++) printf("%s%.6f", i ? "," : "", lps[i]);
        free(lps);
        printf("],\"greedy\":[");
        llama_memory_clear(llama_get_memory(ctx), true);
        if (decode(ctx, tokens, n, 0, 0)) return 1;
        int pos = n;
        for (int g = 0; g < greedy; g++) {
            double lp;
            llama_token t = argmax(llama_get_logits_ith(ctx, -1), n_vocab, &lp);
            printf("%s%d", g ? "," : "", t);
            if (decode(ctx, &t, 1, pos++, 0)) return 1;
        }
        printf("]}\n");
        fflush(stdout);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
