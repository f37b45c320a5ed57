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
    if (const DeviceSample* d = step.sample) {
        if (d->n_penalized < 0 || (d->n_penalized > 0 && !d->penalized))
            fail(PYR_ERR_INVALID_ARGUMENT, std::string(who) + ": a sample's penalized ids are missing");
        for (int32_t i = 0; i < d->n_penalized; ++i)
            if (d->penalized[i] < 0 || d->penalized[i] >= config.n_vocab)
                fail(PYR_ERR_INVALID_ARGUMENT, std::string(who) + ": penalized token id " +
                                                   std::to_string(d->penalized[i]) + " is outside [0, " +
                                                   std::to_string(config.n_vocab) + ")");
    }
}

void Backend::read_logits(KvCache&, float*) {
    fail(PYR_ERR_STATE, device_name() + " keeps no logits on a device");
}

void check_cancel(const SequenceStep* batch, int n_seq) {
    for (int i = 0; i < n_seq; ++i)
        if (cancel_requested(batch[i])) fail(PYR_CANCELLED, "cancelled");
}

}  // namespace pyr
