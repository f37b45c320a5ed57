// safetensors reader. Layout (see shared/docs/FORMATS.md):
//   [0,8) u64 LE header length N | [8,8+N) UTF-8 JSON header | [8+N,EOF) tensor data
// The file is mmap'ed read-only and validated like the reference reader before any tensor
// pointer is handed out, so that a malformed file is an error, never an out-of-bounds read.
#include "model/safetensors.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "common/log.h"
#include "model/json_util.h"

namespace pyr {
namespace {

using json = nlohmann::json;

constexpr uint64_t kMaxHeaderSize = 100000000;  // the reference reader's limit

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// Parses a dtype name. Real safetensors dtypes that pyramid cannot use are reported as
// unsupported; anything else is not a safetensors dtype at all.
DType parse_dtype(const std::string& name, const std::string& where) {
    if (name == "F32") return DType::F32;
    if (name == "F16") return DType::F16;
    if (name == "BF16") return DType::BF16;
    static const std::set<std::string> known = {
        "BOOL", "U8",  "I8",  "U16", "I16", "U32",     "I32",     "U64",     "I64",     "F64",
        "C64",  "F4",  "F6_E2M3",    "F6_E3M2",  "F8_E5M2", "F8_E4M3", "F8_E8M0"};
    if (known.count(name))
        fail(PYR_ERR_UNSUPPORTED, where + " has dtype " + name +
                                      ", which pyramid does not support (F32, F16, BF16)");
    fail(PYR_ERR_FORMAT, where + " has unknown dtype \"" + name + "\"");
}

// numel x elem_size with overflow checks; false on overflow.
bool checked_nbytes(const std::vector<int64_t>& shape, size_t elem_size, uint64_t& out) {
    uint64_t n = elem_size;
    for (int64_t d : shape)
        if (__builtin_mul_overflow(n, uint64_t(d), &n)) return false;
    out = n;
    return true;
}

// A tensor entry as read from the header, before its data pointer is resolved.
struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;
};

// Reads one non-negative integer array (shape or data_offsets) of a tensor entry.
std::vector<int64_t> int_array(const json& j, const std::string& where, const char* key) {
    auto it = j.find(key);
    if (it == j.end()) fail(PYR_ERR_FORMAT, where + " has no \"" + key + "\"");
    if (!it->is_array())
        fail(PYR_ERR_FORMAT, where + ": \"" + key + "\" must be an array, got " +
                                 json_util::type_name(*it));
    std::vector<int64_t> out;
    for (const json& v : *it) {
        int64_t x = 0;
        if (!json_util::get_int64(v, x) || x < 0)
            fail(PYR_ERR_FORMAT, where + ": \"" + key +
                                     "\" must hold non-negative integers, got " + v.dump());
        out.push_back(x);
    }
    return out;
}

Entry parse_entry(const std::string& name, const json& j, const std::string& path) {
    const std::string where = path + ": tensor \"" + name + "\"";
    if (!j.is_object())
        fail(PYR_ERR_FORMAT, where + " must be an object, got " + json_util::type_name(j));
    auto dt = j.find("dtype");
    if (dt == j.end()) fail(PYR_ERR_FORMAT, where + " has no \"dtype\"");
    if (!dt->is_string())
        fail(PYR_ERR_FORMAT, where + ": \"dtype\" must be a string, got " +
                                 json_util::type_name(*dt));
    Entry e{name, parse_dtype(dt->get<std::string>(), where), int_array(j, where, "shape"), 0, 0};
    std::vector<int64_t> off = int_array(j, where, "data_offsets");
    if (off.size() != 2)
        fail(PYR_ERR_FORMAT, where + ": \"data_offsets\" must be [begin, end], got " +
                                 std::to_string(off.size()) + " values");
    if (off[0] > off[1])
        fail(PYR_ERR_FORMAT, where + ": data_offsets begin " + std::to_string(off[0]) +
                                 " is after end " + std::to_string(off[1]));
    e.begin = uint64_t(off[0]);
    e.end = uint64_t(off[1]);
    uint64_t nbytes = 0;
    if (!checked_nbytes(e.shape, dtype_size(e.dtype), nbytes))
        fail(PYR_ERR_FORMAT, where + ": shape " + shape_str(e.shape) + " x " +
                                 std::to_string(dtype_size(e.dtype)) + " bytes overflows");
    if (nbytes != e.end - e.begin)
        fail(PYR_ERR_FORMAT, where + ": shape " + shape_str(e.shape) + " " + dtype_name(e.dtype) +
                                 " needs " + std::to_string(nbytes) +
                                 " bytes but data_offsets span " +
                                 std::to_string(e.end - e.begin));
    return e;
}

void parse_metadata(const json& j, const std::string& path,
                    std::map<std::string, std::string>& out) {
    if (!j.is_object())
        fail(PYR_ERR_FORMAT, path + ": \"__metadata__\" must be an object, got " +
                                 json_util::type_name(j));
    for (auto it = j.begin(); it != j.end(); ++it) {
        if (!it->is_string())
            fail(PYR_ERR_FORMAT, path + ": __metadata__ \"" + it.key() +
                                     "\" must be a string, got " + json_util::type_name(*it));
        out[it.key()] = it->get<std::string>();
    }
}

// Tensors sorted by offset must tile [0, data_size) exactly: no gap, no overlap, nothing
// after the last one. (Each end was already checked against data_size.)
void check_layout(std::vector<Entry>& entries, uint64_t data_size, const std::string& path) {
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    uint64_t pos = 0;
    const Entry* prev = nullptr;
    for (const Entry& e : entries) {
        if (e.begin > pos)
            fail(PYR_ERR_FORMAT,
                 path + ": " +
                     (prev ? "gap of " + std::to_string(e.begin - pos) +
                                 " bytes between tensors \"" + prev->name + "\" (ends at " +
                                 std::to_string(pos) + ") and \""
                           : "data_offsets do not start at 0: first tensor \"") +
                     e.name + "\" begins at " + std::to_string(e.begin));
        if (e.begin < pos)
            fail(PYR_ERR_FORMAT, path + ": tensors \"" + prev->name + "\" [" +
                                     std::to_string(prev->begin) + ", " +
                                     std::to_string(prev->end) + ") and \"" + e.name + "\" [" +
                                     std::to_string(e.begin) + ", " + std::to_string(e.end) +
                                     ") overlap");
        pos = e.end;
        prev = &e;
    }
    if (pos != data_size)
        fail(PYR_ERR_FORMAT, path + ": " + std::to_string(data_size - pos) +
                                 " trailing bytes after the last tensor (data section is " +
                                 std::to_string(data_size) + " bytes, tensors end at " +
                                 std::to_string(pos) + ")");
}

// Parses the header text: UTF-8, JSON, a top-level object, no repeated tensor names
// (nlohmann would silently keep the last one) and no deep nesting (a valid header is at
// most 3 levels deep; this bounds the work a hostile header can cause).
json parse_header_json(const char* text, size_t size, const std::string& path) {
    std::set<std::string> seen;
    bool duplicate = false;
    std::string dup_name;
    auto callback = [&](int depth, json::parse_event_t event, json& value) {
        if (depth > 8)
            fail(PYR_ERR_FORMAT, path + ": header JSON is nested deeper than 8 levels");
        if (event == json::parse_event_t::key && depth == 1 && !duplicate) {
            auto [it, inserted] = seen.insert(value.get<std::string>());
            if (!inserted) {
                duplicate = true;
                dup_name = *it;
            }
        }
        return true;
    };
    json header = json_util::parse(text, size, path + ": header", callback);
    if (duplicate) fail(PYR_ERR_FORMAT, path + ": tensor \"" + dup_name + "\" appears twice");
    if (!header.is_object())
        fail(PYR_ERR_FORMAT, path + ": header must be a JSON object, got " +
                                 json_util::type_name(header));
    return header;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
    uint64_t size = 0;
    const int fd = json_util::open_regular_file(path, size);
    if (size < 8) {
        ::close(fd);
        fail(PYR_ERR_FORMAT, path + ": file is " + std::to_string(size) +
                                 " bytes, too small for the 8-byte header length");
    }
    map_size_ = size_t(size);
    void* map = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    ::close(fd);  // the mapping keeps the file alive
    if (map == MAP_FAILED) fail(PYR_ERR_IO, path + ": cannot mmap: " + std::strerror(err));
    map_ = map;
    try {
        parse();
    } catch (...) {
        unmap();  // the destructor does not run for a constructor that throws
        throw;
    }
}

SafetensorsFile::~SafetensorsFile() { unmap(); }

void SafetensorsFile::unmap() {
    if (map_) ::munmap(map_, map_size_);
    map_ = nullptr;
}

// Reads the header of the mapped file and fills tensors_ and metadata_.
void SafetensorsFile::parse() {
    const auto* bytes = static_cast<const uint8_t*>(map_);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian on any host
    if (n > kMaxHeaderSize)
        fail(PYR_ERR_FORMAT, path_ + ": header length " + std::to_string(n) +
                                 " exceeds the limit of " + std::to_string(kMaxHeaderSize) +
                                 " bytes");
    if (n > map_size_ - 8)
        fail(PYR_ERR_FORMAT, path_ + ": header length " + std::to_string(n) + " needs " +
                                 std::to_string(8 + n) + " bytes but the file has " +
                                 std::to_string(map_size_));
    json header = parse_header_json(reinterpret_cast<const char*>(bytes + 8), size_t(n), path_);
    const uint64_t data_start = 8 + n;
    const uint64_t data_size = map_size_ - data_start;
    std::vector<Entry> entries;
    for (auto it = header.begin(); it != header.end(); ++it) {
        if (it.key() == "__metadata__") {
            parse_metadata(*it, path_, metadata_);
            continue;
        }
        Entry e = parse_entry(it.key(), *it, path_);
        if (e.end > data_size)
            fail(PYR_ERR_FORMAT, path_ + ": tensor \"" + e.name + "\" ends at data offset " +
                                     std::to_string(e.end) + ", beyond the data section of " +
                                     std::to_string(data_size) +
                                     " bytes (file truncated?)");
        entries.push_back(std::move(e));
    }
    check_layout(entries, data_size, path_);
    for (const Entry& e : entries) add_tensor(e.name, e.dtype, e.shape, data_start + e.begin,
                                              e.end - e.begin);
}

// Adds a validated tensor. Data whose file offset is not a multiple of the element size is
// copied: callers read it as float/uint16_t arrays, which must be aligned.
void SafetensorsFile::add_tensor(const std::string& name, DType dtype,
                                 const std::vector<int64_t>& shape, uint64_t file_offset,
                                 uint64_t nbytes) {
    TensorInfo t;
    t.name = name;
    t.dtype = dtype;
    t.shape = shape;
    t.nbytes = size_t(nbytes);
    t.file = path_;
    const uint8_t* src = static_cast<const uint8_t*>(map_) + file_offset;
    if (file_offset % dtype_size(dtype) != 0) {
        // new[] storage is aligned to at least alignof(std::max_align_t).
        aligned_copies_.emplace_back(new uint8_t[std::max<size_t>(t.nbytes, 1)]);
        std::memcpy(aligned_copies_.back().get(), src, t.nbytes);
        src = aligned_copies_.back().get();
    }
    t.data = src;
    tensors_.emplace(name, std::move(t));
}

// ---- TensorStore --------------------------------------------------------------------------

namespace {

// Shard names come from a file we do not trust: only plain names inside the directory.
void check_shard_name(const std::string& shard, const std::string& index_path) {
    if (shard.empty() || shard.find('/') != std::string::npos ||
        shard.find('\\') != std::string::npos || shard.find("..") != std::string::npos ||
        shard.find('\0') != std::string::npos)
        fail(PYR_ERR_FORMAT, index_path + ": shard name \"" + shard +
                                 "\" is not a plain file name (no '/', '\\', '..', empty)");
}

bool file_exists(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0;
}

// weight_map of model.safetensors.index.json: tensor name -> shard file name.
std::map<std::string, std::string> read_weight_map(const std::string& index_path) {
    std::string text = json_util::read_text_file(index_path);
    json root = json_util::parse(text.data(), text.size(), index_path);
    if (!root.is_object())
        fail(PYR_ERR_FORMAT, index_path + ": top level must be a JSON object, got " +
                                 json_util::type_name(root));
    auto wm = root.find("weight_map");
    if (wm == root.end()) fail(PYR_ERR_FORMAT, index_path + ": missing \"weight_map\"");
    if (!wm->is_object())
        fail(PYR_ERR_FORMAT, index_path + ": \"weight_map\" must be an object, got " +
                                 json_util::type_name(*wm));
    if (wm->empty()) fail(PYR_ERR_FORMAT, index_path + ": \"weight_map\" is empty");
    std::map<std::string, std::string> out;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
        if (!it->is_string())
            fail(PYR_ERR_FORMAT, index_path + ": weight_map \"" + it.key() +
                                     "\" must be a shard file name, got " +
                                     json_util::type_name(*it));
        check_shard_name(it->get<std::string>(), index_path);
        out[it.key()] = it->get<std::string>();
    }
    return out;
}

}  // namespace

std::unique_ptr<TensorStore> TensorStore::open_dir(const std::string& dir) {
    auto store = std::unique_ptr<TensorStore>(new TensorStore());
    store->dir_ = dir;
    const std::string index_path = dir + "/model.safetensors.index.json";
    const std::string single_path = dir + "/model.safetensors";
    // HF's from_pretrained order: the single file first, then the index
    if (file_exists(single_path)) {
        if (file_exists(index_path))
            PYR_LOG_INFO("loading " + single_path + " (as HF does); " + index_path + " is not used");
        store->add_file(std::make_unique<SafetensorsFile>(single_path));
    } else if (file_exists(index_path)) {
        store->open_sharded(index_path);
    } else {
        fail(PYR_ERR_IO, "no model.safetensors or model.safetensors.index.json in " + dir);
    }
    return store;
}

// Opens each distinct shard of the index once and checks that every tensor of the
// weight map is in the shard the index names.
void TensorStore::open_sharded(const std::string& index_path) {
    std::map<std::string, std::string> weight_map = read_weight_map(index_path);
    std::map<std::string, const SafetensorsFile*> shards;
    for (const auto& [tensor, shard] : weight_map) {
        if (shards.count(shard)) continue;
        std::unique_ptr<SafetensorsFile> file;
        try {
            file = std::make_unique<SafetensorsFile>(dir_ + "/" + shard);
        } catch (const Error& e) {
            fail(e.status(), std::string(e.what()) + " (shard listed in " + index_path + ")");
        }
        shards[shard] = file.get();
        add_file(std::move(file));
    }
    for (const auto& [tensor, shard] : weight_map)
        if (!shards[shard]->tensors().count(tensor))
            fail(PYR_ERR_FORMAT, index_path + ": weight_map puts tensor \"" + tensor +
                                     "\" in " + shard + ", which does not contain it");
}

void TensorStore::add_file(std::unique_ptr<SafetensorsFile> file) {
    for (const auto& [name, info] : file->tensors()) {
        auto [it, inserted] = index_.emplace(name, &info);
        if (!inserted)
            fail(PYR_ERR_FORMAT, "tensor \"" + name + "\" is in both " + it->second->file +
                                     " and " + file->path());
    }
    files_.push_back(std::move(file));
}

const TensorInfo* TensorStore::find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : it->second;
}

const TensorInfo& TensorStore::require(const std::string& name,
                                       const std::vector<int64_t>& shape) const {
    const TensorInfo* t = find(name);
    if (!t) fail(PYR_ERR_FORMAT, dir_ + ": missing tensor \"" + name + "\"");
    if (t->shape != shape)
        fail(PYR_ERR_FORMAT, t->file + ": tensor \"" + name + "\" has shape " +
                                 shape_str(t->shape) + ", expected " + shape_str(shape));
    return *t;
}

uint64_t TensorStore::total_bytes() const {
    uint64_t total = 0;
    for (const auto& [name, info] : index_) total += info->nbytes;
    return total;
}

}  // namespace pyr
