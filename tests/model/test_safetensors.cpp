// safetensors reader and TensorStore: good files read back exactly; every malformed variant
// FORMATS.md lists is rejected with a message naming the file and the problem. The files
// are built byte by byte with model_test_util.h. To add a case: build the bytes, write them
// into a TempDir, check open() fails with CHECK_PYR_ERROR.
#include "model/safetensors.h"

#include <set>

#include "model_test_util.h"

using pyr_test::json;
using pyr_test::safetensors_bytes;
using pyr_test::safetensors_raw;
using pyr_test::StTensor;
using pyr_test::TempDir;
using pyr_test::write_file;

namespace {

// Writes `bytes` as <dir>/t.safetensors and opens it.
std::unique_ptr<pyr::SafetensorsFile> open_bytes(const TempDir& dir, const std::string& bytes) {
    write_file(dir / "t.safetensors", bytes);
    return std::make_unique<pyr::SafetensorsFile>(dir / "t.safetensors");
}

// A header entry, for hand-made headers.
json entry(const std::string& dtype, std::vector<int64_t> shape, int64_t begin, int64_t end) {
    return json{{"dtype", dtype}, {"shape", shape}, {"data_offsets", {begin, end}}};
}

std::string data_of(size_t n) { return std::string(n, '\x01'); }

bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

}  // namespace

TEST_CASE("safetensors: a good file reads back every dtype, metadata and padding") {
    TempDir dir;
    std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 1e-3f, 42.0f};
    std::vector<uint16_t> h = {0x3c00, 0xc000, 0x3555};  // f16: 1, -2, ~0.333
    std::vector<uint16_t> b = {0x3f80, 0x4049};          // bf16: 1, ~3.14
    auto f = open_bytes(dir, safetensors_bytes({{"a", "F32", {2, 3}, pyr_test::f32_bytes(a)},
                                                {"h", "F16", {3}, pyr_test::raw_bytes(h)},
                                                {"b", "BF16", {1, 2}, pyr_test::raw_bytes(b)},
                                                {"empty", "F32", {0, 4}, ""}},
                                               /*header_len=*/512, json{{"format", "pt"}}));
    REQUIRE(f->tensors().size() == 4);
    CHECK(f->metadata().at("format") == "pt");
    const pyr::TensorInfo& ta = f->tensors().at("a");
    CHECK(ta.dtype == pyr::DType::F32);
    CHECK(ta.shape == std::vector<int64_t>{2, 3});
    CHECK(ta.nbytes == 24);
    CHECK(ta.file == dir / "t.safetensors");
    CHECK(std::memcmp(ta.data, a.data(), 24) == 0);
    const pyr::TensorInfo& th = f->tensors().at("h");
    CHECK(th.dtype == pyr::DType::F16);
    float out[3];
    pyr::convert_to_f32(th.dtype, th.data, out, 3);
    CHECK(out[0] == 1.0f);
    CHECK(out[1] == -2.0f);
    const pyr::TensorInfo& tb = f->tensors().at("b");
    CHECK(tb.dtype == pyr::DType::BF16);
    pyr::convert_to_f32(tb.dtype, tb.data, out, 2);
    CHECK(out[0] == 1.0f);
    CHECK(out[1] == doctest::Approx(3.140625f));
    CHECK(f->tensors().at("empty").nbytes == 0);
}

TEST_CASE("safetensors: unaligned tensor data is copied and reads correctly") {
    TempDir dir;
    std::vector<float> a = {1.0f, 2.0f, -3.5f, 1e30f, -0.0f};
    std::vector<uint16_t> h = {0x3c00, 0x4000, 0x4200};
    // 8 + N = 8 + 201 is odd, so the F32 tensor at offset 0 starts at an odd file offset,
    // and the F16 tensor after it (20 bytes later) too.
    std::string bytes = safetensors_bytes({{"a", "F32", {5}, pyr_test::f32_bytes(a)},
                                           {"h", "F16", {3}, pyr_test::raw_bytes(h)}},
                                          /*header_len=*/201);
    REQUIRE(bytes.substr(0, 8) == pyr_test::u64_le(201));
    auto f = open_bytes(dir, bytes);
    const pyr::TensorInfo& ta = f->tensors().at("a");
    CHECK(aligned(ta.data, 4));
    const float* fa = static_cast<const float*>(ta.data);
    for (size_t i = 0; i < a.size(); ++i) CHECK(fa[i] == a[i]);
    const pyr::TensorInfo& th = f->tensors().at("h");
    CHECK(aligned(th.data, 2));
    CHECK(static_cast<const uint16_t*>(th.data)[2] == 0x4200);
}

TEST_CASE("safetensors: file and header length errors") {
    TempDir dir;
    const std::string path = dir / "t.safetensors";
    SUBCASE("missing file") {
        CHECK_PYR_ERROR(pyr::SafetensorsFile(path), PYR_ERR_IO, path.c_str(), "cannot open",
                        "No such file");
    }
    SUBCASE("a directory") {
        CHECK_PYR_ERROR(pyr::SafetensorsFile(dir.path()), PYR_ERR_IO, "not a regular file");
    }
    SUBCASE("shorter than 8 bytes") {
        CHECK_PYR_ERROR(open_bytes(dir, std::string("\x05\0\0", 3)), PYR_ERR_FORMAT, path.c_str(), "3 bytes");
        CHECK_PYR_ERROR(open_bytes(dir, ""), PYR_ERR_FORMAT, path.c_str(), "0 bytes");
    }
    SUBCASE("header length beyond the file") {
        std::string bytes = pyr_test::u64_le(1000) + "{}" + data_of(90);
        CHECK_PYR_ERROR(open_bytes(dir, bytes), PYR_ERR_FORMAT, path.c_str(), "header length 1000",
                        "1008", "100");
    }
    SUBCASE("header length over 100 MB") {
        std::string bytes = pyr_test::u64_le(100000001) + "{}";
        CHECK_PYR_ERROR(open_bytes(dir, bytes), PYR_ERR_FORMAT, "100000001", "100000000");
        bytes = pyr_test::u64_le(~uint64_t(0)) + "{}";  // 8+N would overflow
        CHECK_PYR_ERROR(open_bytes(dir, bytes), PYR_ERR_FORMAT, "header length");
    }
    SUBCASE("an empty but valid file") {
        CHECK(open_bytes(dir, safetensors_raw("{}", ""))->tensors().empty());
        CHECK(open_bytes(dir, safetensors_raw("{}    ", ""))->tensors().empty());
    }
}

TEST_CASE("safetensors: header content errors") {
    TempDir dir;
    const std::string path = dir / "t.safetensors";
    auto open_header = [&](const json& header, size_t data_size) {
        return open_bytes(dir, safetensors_raw(header.dump(), data_of(data_size)));
    };
    SUBCASE("invalid JSON") {
        CHECK_PYR_ERROR(open_bytes(dir, safetensors_raw("{\"a\": {\"dtype\": ", "")),
                        PYR_ERR_FORMAT, path.c_str(), "header", "invalid JSON");
    }
    SUBCASE("not UTF-8") {
        std::string header = "{\"a\xff\xfe\": {\"dtype\": \"F32\", \"shape\": [1], "
                             "\"data_offsets\": [0, 4]}}";
        CHECK_PYR_ERROR(open_bytes(dir, safetensors_raw(header, data_of(4))), PYR_ERR_FORMAT,
                        path.c_str(), "UTF-8", "byte 3");
        CHECK_PYR_ERROR(open_bytes(dir, safetensors_raw("{\"\xed\xa0\x80\": 1}", "")),
                        PYR_ERR_FORMAT, "UTF-8");  // an encoded surrogate
    }
    SUBCASE("number too large for a double") {
        CHECK_PYR_ERROR(open_bytes(dir, safetensors_raw("{\"w\": 1e999}", "")), PYR_ERR_FORMAT,
                        path.c_str(), "invalid JSON");
    }
    SUBCASE("not an object") {
        CHECK_PYR_ERROR(open_bytes(dir, safetensors_raw("[1, 2]", "")), PYR_ERR_FORMAT,
                        "header must be a JSON object", "array");
    }
    SUBCASE("deeply nested") {
        std::string deep = "{\"a\": " + std::string(50, '[') + std::string(50, ']') + "}";
        CHECK_PYR_ERROR(open_bytes(dir, safetensors_raw(deep, "")), PYR_ERR_FORMAT, "nested");
    }
    SUBCASE("entry missing a field or with a wrong type") {
        json e = entry("F32", {1}, 0, 4);
        for (const char* key : {"dtype", "shape", "data_offsets"}) {
            CAPTURE(key);
            json bad = e;
            bad.erase(key);
            CHECK_PYR_ERROR(open_header({{"w", bad}}, 4), PYR_ERR_FORMAT, "tensor \"w\"", key);
        }
        CHECK_PYR_ERROR(open_header({{"w", 3}}, 4), PYR_ERR_FORMAT, "tensor \"w\"", "object");
        json bad = e;
        bad["dtype"] = 32;
        CHECK_PYR_ERROR(open_header({{"w", bad}}, 4), PYR_ERR_FORMAT, "\"dtype\"", "string");
        bad = e;
        bad["shape"] = "1";
        CHECK_PYR_ERROR(open_header({{"w", bad}}, 4), PYR_ERR_FORMAT, "\"shape\"", "array");
        bad = e;
        bad["shape"] = {1.5};
        CHECK_PYR_ERROR(open_header({{"w", bad}}, 4), PYR_ERR_FORMAT, "\"shape\"", "integers");
        bad = e;
        bad["data_offsets"] = {0, 4, 8};
        CHECK_PYR_ERROR(open_header({{"w", bad}}, 4), PYR_ERR_FORMAT, "data_offsets", "3 values");
        bad["data_offsets"] = {4, 0};
        CHECK_PYR_ERROR(open_header({{"w", bad}}, 4), PYR_ERR_FORMAT, "begin 4", "end 0");
    }
    SUBCASE("negative dimension") {
        CHECK_PYR_ERROR(open_header({{"w", entry("F32", {-1, 4}, 0, 4)}}, 4), PYR_ERR_FORMAT,
                        "tensor \"w\"", "non-negative", "-1");
    }
    SUBCASE("unknown and unsupported dtypes") {
        CHECK_PYR_ERROR(open_header({{"w", entry("Q4_K", {4}, 0, 4)}}, 4), PYR_ERR_FORMAT,
                        path.c_str(), "tensor \"w\"", "unknown dtype", "Q4_K");
        CHECK_PYR_ERROR(open_header({{"ids", entry("I64", {1}, 0, 8)}}, 8), PYR_ERR_UNSUPPORTED,
                        "tensor \"ids\"", "I64", "not support");
    }
    SUBCASE("numel x element size differs from the offsets") {
        CHECK_PYR_ERROR(open_header({{"w", entry("F16", {2, 3}, 0, 10)}}, 10), PYR_ERR_FORMAT,
                        "tensor \"w\"", "[2, 3]", "12 bytes", "span 10");
    }
    SUBCASE("numel x element size overflows") {
        int64_t big = int64_t(1) << 40;
        CHECK_PYR_ERROR(open_header({{"w", entry("F32", {big, big}, 0, 4)}}, 4), PYR_ERR_FORMAT,
                        "tensor \"w\"", "overflows");
    }
    SUBCASE("duplicate tensor name") {
        std::string header = "{\"w\": " + entry("F32", {1}, 0, 4).dump() + ", \"w\": " +
                             entry("F32", {1}, 4, 8).dump() + "}";
        CHECK_PYR_ERROR(open_bytes(dir, safetensors_raw(header, data_of(8))), PYR_ERR_FORMAT,
                        "\"w\"", "twice");
    }
    SUBCASE("__metadata__ must map strings to strings") {
        CHECK_PYR_ERROR(open_header({{"__metadata__", {{"format", 1}}}}, 0), PYR_ERR_FORMAT,
                        "__metadata__", "format", "string");
        CHECK_PYR_ERROR(open_header({{"__metadata__", "pt"}}, 0), PYR_ERR_FORMAT, "__metadata__",
                        "object");
    }
}

TEST_CASE("safetensors: data layout errors") {
    TempDir dir;
    const std::string path = dir / "t.safetensors";
    auto open_header = [&](const json& header, size_t data_size) {
        return open_bytes(dir, safetensors_raw(header.dump(), data_of(data_size)));
    };
    SUBCASE("overlapping offsets") {
        CHECK_PYR_ERROR(open_header({{"a", entry("F32", {2}, 0, 8)}, {"b", entry("F32", {2}, 4, 12)}},
                                    12),
                        PYR_ERR_FORMAT, path.c_str(), "\"a\" [0, 8)", "\"b\" [4, 12)", "overlap");
    }
    SUBCASE("gapped offsets") {
        CHECK_PYR_ERROR(open_header({{"a", entry("F32", {1}, 0, 4)}, {"b", entry("F32", {1}, 8, 12)}},
                                    12),
                        PYR_ERR_FORMAT, path.c_str(), "gap of 4 bytes", "\"a\"", "\"b\"");
    }
    SUBCASE("offsets not starting at 0") {
        CHECK_PYR_ERROR(open_header({{"a", entry("F32", {1}, 4, 8)}}, 8), PYR_ERR_FORMAT,
                        "do not start at 0", "\"a\"", "begins at 4");
    }
    SUBCASE("trailing bytes") {
        CHECK_PYR_ERROR(open_header({{"a", entry("F32", {1}, 0, 4)}}, 7), PYR_ERR_FORMAT,
                        path.c_str(), "3 trailing bytes");
        CHECK_PYR_ERROR(open_header(json::object(), 2), PYR_ERR_FORMAT, "2 trailing bytes");
    }
    SUBCASE("truncated data (end beyond the data section)") {
        std::string good = safetensors_bytes({{"a", "F32", {4}, ""}, {"b", "F16", {8}, ""}});
        std::string cut = good.substr(0, good.size() - 5);
        CHECK_PYR_ERROR(open_bytes(dir, cut), PYR_ERR_FORMAT, path.c_str(), "tensor \"b\"",
                        "ends at data offset 32", "data section of 27 bytes");
    }
    SUBCASE("end beyond the file by a huge offset") {
        CHECK_PYR_ERROR(open_header({{"a", entry("F32", {int64_t(1) << 60}, 0, int64_t(1) << 62)}},
                                    4),
                        PYR_ERR_FORMAT, "tensor \"a\"");
    }
}

// ---- TensorStore --------------------------------------------------------------------------

namespace {

std::string shard(const std::vector<std::string>& names) {
    std::vector<StTensor> t;
    for (const std::string& n : names) t.push_back({n, "F32", {2, 2}, ""});
    return safetensors_bytes(t);
}

void write_index(const TempDir& dir, const json& weight_map) {
    json index = {{"metadata", {{"total_size", 1}}}, {"weight_map", weight_map}};
    write_file(dir / "model.safetensors.index.json", index.dump(1));
}

}  // namespace

TEST_CASE("TensorStore: single file, require and find") {
    TempDir dir;
    write_file(dir / "model.safetensors", shard({"x", "y"}));
    auto store = pyr::TensorStore::open_dir(dir.path());
    CHECK(store->find("x") != nullptr);
    CHECK(store->find("nope") == nullptr);
    CHECK(store->require("y", {2, 2}).nbytes == 16);
    CHECK(store->total_bytes() == 32);
    CHECK_PYR_ERROR(store->require("y", {4}), PYR_ERR_FORMAT, "model.safetensors", "\"y\"",
                    "[2, 2]", "expected [4]");
    CHECK_PYR_ERROR(store->require("z", {2, 2}), PYR_ERR_FORMAT, "missing tensor", "\"z\"",
                    dir.path().c_str());
}

TEST_CASE("TensorStore: sharded checkpoints") {
    TempDir dir;
    write_file(dir / "s1.safetensors", shard({"a", "b"}));
    write_file(dir / "s2.safetensors", shard({"c"}));
    SUBCASE("good index, each shard opened once, total_size not trusted") {
        write_index(dir, {{"a", "s1.safetensors"}, {"b", "s1.safetensors"}, {"c", "s2.safetensors"}});
        auto store = pyr::TensorStore::open_dir(dir.path());
        CHECK(store->total_bytes() == 48);
        CHECK(store->find("a")->file == dir / "s1.safetensors");
        CHECK(store->find("c")->file == dir / "s2.safetensors");
    }
    SUBCASE("a single file beside an index wins, as in HF's from_pretrained") {
        write_index(dir, {{"a", "s1.safetensors"}, {"b", "s1.safetensors"}, {"c", "s2.safetensors"}});
        write_file(dir / "model.safetensors", shard({"x"}));
        auto store = pyr::TensorStore::open_dir(dir.path());
        CHECK(store->total_bytes() == 16);
        CHECK(store->find("x")->file == dir / "model.safetensors");
        CHECK(store->find("a") == nullptr);
    }
    SUBCASE("shard names that leave the directory") {
        for (const char* name : {"../s1.safetensors", "sub/s1.safetensors", "/tmp/s1.safetensors",
                                 "..", "a\\b.safetensors", ""}) {
            CAPTURE(name);
            write_index(dir, {{"a", name}});
            CHECK_PYR_ERROR(pyr::TensorStore::open_dir(dir.path()), PYR_ERR_FORMAT,
                            "model.safetensors.index.json", "not a plain file name");
        }
    }
    SUBCASE("shard listed in the index but absent") {
        write_index(dir, {{"a", "s1.safetensors"}, {"z", "s9.safetensors"}});
        CHECK_PYR_ERROR(pyr::TensorStore::open_dir(dir.path()), PYR_ERR_IO, "s9.safetensors",
                        "cannot open", "index.json");
    }
    SUBCASE("tensor mapped to a shard that lacks it") {
        write_index(dir, {{"a", "s2.safetensors"}, {"c", "s2.safetensors"}});
        CHECK_PYR_ERROR(pyr::TensorStore::open_dir(dir.path()), PYR_ERR_FORMAT, "\"a\"",
                        "s2.safetensors", "does not contain it");
    }
    SUBCASE("the same tensor in two shards") {
        write_file(dir / "s3.safetensors", shard({"c", "d"}));
        write_index(dir, {{"a", "s1.safetensors"}, {"c", "s2.safetensors"}, {"d", "s3.safetensors"}});
        CHECK_PYR_ERROR(pyr::TensorStore::open_dir(dir.path()), PYR_ERR_FORMAT, "\"c\"",
                        "s2.safetensors", "s3.safetensors");
    }
    SUBCASE("malformed index") {
        write_file(dir / "model.safetensors.index.json", "{\"weight_map\": {\"a\": ");
        CHECK_PYR_ERROR(pyr::TensorStore::open_dir(dir.path()), PYR_ERR_FORMAT,
                        "model.safetensors.index.json", "invalid JSON");
        write_file(dir / "model.safetensors.index.json", "{\"metadata\": {}}");
        CHECK_PYR_ERROR(pyr::TensorStore::open_dir(dir.path()), PYR_ERR_FORMAT, "weight_map");
        write_index(dir, {{"a", 5}});
        CHECK_PYR_ERROR(pyr::TensorStore::open_dir(dir.path()), PYR_ERR_FORMAT, "\"a\"",
                        "shard file name");
        write_index(dir, json::object());
        CHECK_PYR_ERROR(pyr::TensorStore::open_dir(dir.path()), PYR_ERR_FORMAT, "empty");
    }
    SUBCASE("a malformed shard names the shard") {
        write_file(dir / "s2.safetensors", "\x02");
        write_index(dir, {{"a", "s1.safetensors"}, {"c", "s2.safetensors"}});
        CHECK_PYR_ERROR(pyr::TensorStore::open_dir(dir.path()), PYR_ERR_FORMAT, "s2.safetensors",
                        "1 bytes");
    }
}

TEST_CASE("TensorStore: no weights in the directory") {
    TempDir dir;
    CHECK_PYR_ERROR(pyr::TensorStore::open_dir(dir.path()), PYR_ERR_IO,
                    "no model.safetensors or model.safetensors.index.json in",
                    dir.path().c_str());
}

TEST_CASE("TensorStore: the bundled model has 4 F16 shards") {
    auto store = pyr::TensorStore::open_dir(PYR_TEST_MODEL_DIR);
    const pyr::TensorInfo* embd = store->find("model.embed_tokens.weight");
    REQUIRE(embd != nullptr);
    CHECK(embd->shape == std::vector<int64_t>{4096, 384});
    CHECK(embd->dtype == pyr::DType::F16);
    std::set<std::string> files;
    for (int il = 0; il < 10; ++il)
        files.insert(store->require("model.layers." + std::to_string(il) + ".mlp.up_proj.weight",
                                    {1024, 384})
                         .file);
    files.insert(store->find("lm_head.weight")->file);
    CHECK(files.size() == 4);
    CHECK(store->total_bytes() == 37764864);  // 18,882,432 F16 parameters
}
