#include "backend/backend.h"

#include "common/error.h"

namespace pyr {

void check_sequence_step(const ModelConfig& config, const SequenceStep& step, const char* who) {
    if (!step.tokens || !step.positions || step.n_tokens <= 0 || !step.cache)
        fail(PYR_ERR_INVALID_ARGUMENT, std::string(who) + ": a step needs tokens, positions, "
                                                          "n_tokens > 0 and a cache");
    PYR_ASSERT(step.cache->n_layer() == config.n_layer);
    for (int32_t t = 0; t < step.n_tokens; ++t) {
        if (step.tokens[t] < 0 || step.tokens[t] >= config.n_vocab)
            fail(PYR_ERR_INVALID_ARGUMENT, std::string(who) + ": token id " +
                                               std::to_string(step.tokens[t]) + " is outside [0, " +
                                               std::to_string(config.n_vocab) + ")");
        if (step.positions[t] < 0)
            fail(PYR_ERR_INVALID_ARGUMENT, std::string(who) + ": negative position " +
                                               std::to_string(step.positions[t]));
    }
}

void check_cancel(const SequenceStep* batch, int n_seq) {
    for (int i = 0; i < n_seq; ++i)
        if (cancel_requested(batch[i])) fail(PYR_CANCELLED, "cancelled");
}

}  // namespace pyr
