// The engine's PyramidInfer (CPU) against the slow reference of DESIGN.md section 5
// (pyramid_reference.h): the plan's per-layer counts, the kept original positions of every
// layer right after prefill and after each generated token, and the greedy tokens, over
// several models (MHA, GQA, F16, 2 to 10 layers), prompt lengths, retentions, explicit knobs
// and both prefill_shrink modes. To add a case: append a CaseSpec to the model's list.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "pyramid_compare.h"

using pyr_test::CaseOutcome;
using pyr_test::CaseSpec;

namespace {

struct Totals {
    int cases = 0, tokens = 0, near_ties = 0, compressions = 0;
};

// Runs each case (failures name it); reports near-ties and how much was compared.
void run_model_cases(const std::string& dir, const std::vector<CaseSpec>& cases) {
    auto engine = pyr_test::open_engine(dir);
    const pyr_ref::RefModel model = pyr_ref::RefModel::load(dir);
    Totals t;
    for (const CaseSpec& cs : cases) {
        const CaseOutcome out = pyr_test::run_case(engine, model, cs);
        ++t.cases, t.tokens += out.tokens, t.near_ties += out.near_ties;
        t.compressions += out.compressions;
        // The case must exercise generation-phase compression when E allows it.
        if (cs.gen_e > 0 && !out.stopped && cs.n_gen >= 2 * cs.gen_e) {
            CAPTURE(cs.name);
            CHECK(out.compressions > 0);
        }
        if (out.eos) MESSAGE(cs.name << ": EOS after " << out.tokens << " tokens");
    }
    MESSAGE(dir << ": " << t.cases << " cases, " << t.tokens << " tokens, " << t.compressions
                << " generation compressions, " << t.near_ties << " near-tie(s)");
}

CaseSpec make(const std::string& name, int32_t n_prompt, double retention, bool shrink,
              int32_t gen_e, int32_t min_context = 16) {
    CaseSpec cs;
    cs.name = name, cs.n_prompt = n_prompt, cs.retention = retention, cs.shrink = shrink;
    cs.gen_e = gen_e, cs.min_context = min_context;
    cs.seed = uint32_t(n_prompt * 7 + gen_e);
    return cs;
}

CaseSpec with_seed(CaseSpec cs, uint32_t seed) {  // a prompt on which greedy avoids EOS
    cs.seed = seed;
    return cs;
}

CaseSpec with_knobs(CaseSpec cs, double rho, double gamma) {
    cs.rho = rho, cs.gamma = gamma;
    return cs;
}

}  // namespace

TEST_CASE("pyramid vs reference: fixture mha_f32 (2 layers, MHA)") {
    run_model_cases(pyr_test::kFixtures + "/mha_f32", {
        with_knobs(make("P120 rho 0.5 E4 shrink", 120, 0.0, true, 4, 8), 0.5, 1.0),
        with_knobs(make("P120 rho 0.5 E4 no shrink", 120, 0.0, false, 4, 8), 0.5, 1.0),
        make("P200 retention 0.5 E8 shrink", 200, 0.5, true, 8),
    });
}

TEST_CASE("pyramid vs reference: fixture gqa_f16 (3 layers, GQA 8/2, F16)") {
    run_model_cases(pyr_test::kFixtures + "/gqa_f16", {
        with_seed(make("P150 retention 0.5 E8 shrink", 150, 0.5, true, 8), 2),
        with_seed(make("P150 retention 0.5 E8 no shrink", 150, 0.5, false, 8), 5),
        make("P180 retention 0.3 E4 shrink", 180, 0.3, true, 4, 4),
    });
}

TEST_CASE("pyramid vs reference: fixture head_dim_override_bf16 (head_dim 24, BF16)") {
    run_model_cases(pyr_test::kFixtures + "/head_dim_override_bf16", {
        make("P160 retention 0.5 E8 shrink", 160, 0.5, true, 8),
        make("P160 retention 0.7 E4 no shrink", 160, 0.7, false, 4),
    });
}

TEST_CASE("pyramid vs reference: random 6-layer GQA 4/2") {
    pyr_test::TempDir dir;
    pyr_test::write_random_llama(dir.path(), {6, 48, 4, 2, 96, 61});
    CaseSpec few_sinks = with_knobs(make("P64 context below sinks", 64, 0.0, true, 4, 2), 0.0, 4.0);
    few_sinks.sinks = 8;  // deep layers keep 2 context tokens: the first two sinks
    CaseSpec no_sinks = make("P200 retention 0.5 sinks 0", 200, 0.5, true, 8);
    no_sinks.sinks = 0;
    CaseSpec tiny = with_knobs(make("P5 rho 0.5 E2", 5, 0.0, true, 2, 0), 0.5, 1.0);
    CaseSpec one = make("P1 E2", 1, 0.0, true, 2, 0);
    CaseSpec recent = make("P200 rho 0.6 gamma 2 recent 0.05", 200, 0.0, true, 4, 8);
    recent = with_knobs(recent, 0.6, 2.0);
    recent.recent_ratio = 0.05;
    run_model_cases(dir.path(), {
        make("P200 retention 0.3 E4 shrink", 200, 0.3, true, 4),
        make("P200 retention 0.5 E8 shrink", 200, 0.5, true, 8),
        make("P200 retention 0.7 E8 shrink", 200, 0.7, true, 8),
        make("P200 retention 0.3 E4 no shrink", 200, 0.3, false, 4),
        make("P200 retention 0.5 E8 no shrink", 200, 0.5, false, 8),
        make("P200 retention 0.7 E4 no shrink", 200, 0.7, false, 4),
        with_knobs(make("P150 rho 0.2 gamma 3 E16", 150, 0.0, true, 16, 8), 0.2, 3.0),
        recent, few_sinks, no_sinks, tiny, one,
    });
}

TEST_CASE("pyramid vs reference: random 10-layer GQA 4/2") {
    pyr_test::TempDir dir;
    pyr_test::write_random_llama(dir.path(), {10, 32, 4, 2, 64, 62});
    CaseSpec long_gen = make("P250 retention 0.3 E16 60 tokens", 250, 0.3, true, 16);
    long_gen.n_gen = 60;
    run_model_cases(dir.path(), {
        with_knobs(make("P160 rho 0.3 gamma 2 E8", 160, 0.0, true, 8, 8), 0.3, 2.0),
        make("P97 retention 0.5 E4 no shrink", 97, 0.5, false, 4, 4),
        make("P300 retention 0.5 E8 shrink", 300, 0.5, true, 8),
        make("P300 retention 0.7 E8 no shrink", 300, 0.7, false, 8),
        long_gen,
    });
}

// The bundled model on code it was trained for (a trained model's attention has real sinks
// and heavy hitters, unlike random weights).
TEST_CASE("pyramid vs reference: bundled tiny-code-llama, P about 300") {
    auto engine = pyr_test::open_engine(PYR_TEST_MODEL_DIR);
    std::vector<int32_t> prompt =
        engine->model().tokenizer().encode(pyr_test::kCodeText, /*add_bos=*/true);
    REQUIRE(prompt.size() >= 250);
    prompt.resize(std::min<size_t>(prompt.size(), 300));
    auto code_case = [&](const std::string& name, double retention, bool shrink) {
        CaseSpec cs = make(name, int32_t(prompt.size()), retention, shrink, 16, 64);
        cs.prompt = prompt;
        return cs;
    };
    const pyr_ref::RefModel model = pyr_ref::RefModel::load(PYR_TEST_MODEL_DIR);
    for (const CaseSpec& cs : {code_case("code retention 0.5 shrink", 0.5, true),
                               code_case("code retention 0.5 no shrink", 0.5, false)}) {
        const CaseOutcome out = pyr_test::run_case(engine, model, cs);
        CHECK(out.compressions > 0);
        MESSAGE(cs.name << ": " << out.tokens << " tokens, " << out.compressions
                        << " generation compressions, " << out.near_ties << " near-tie(s)");
    }
}
