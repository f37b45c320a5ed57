// Validated, memory-mapped safetensors files and the tensor store of a checkpoint directory.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace pyr {

// One tensor inside a loaded file. `data` points into the mapping (or into an aligned copy
// when the file's offset is not a multiple of the element size) and lives as long as the
// SafetensorsFile / TensorStore that returned it.
struct TensorInfo {
    std::string name;
    DType dtype = DType::F32;
    std::vector<int64_t> shape;
    const void* data = nullptr;
    size_t nbytes = 0;
    std::string file;  // the file it came from, for messages
};

// One .safetensors file, mmap'ed read-only and validated like the reference reader:
// header length bounds, UTF-8 JSON, known dtypes, contiguous in-bounds offsets starting at 0,
// sizes = numel x element size (overflow checked), no trailing bytes.
// Throws pyr::Error: PYR_ERR_IO (cannot open/map) or PYR_ERR_FORMAT, naming the file.
class SafetensorsFile {
public:
    explicit SafetensorsFile(const std::string& path);
    ~SafetensorsFile();
    SafetensorsFile(const SafetensorsFile&) = delete;
    SafetensorsFile& operator=(const SafetensorsFile&) = delete;

    const std::string& path() const { return path_; }
    const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
    const std::map<std::string, std::string>& metadata() const { return metadata_; }

private:
    void parse();
    void add_tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                    uint64_t file_offset, uint64_t nbytes);
    void unmap();

    std::string path_;
    void* map_ = nullptr;
    size_t map_size_ = 0;
    std::map<std::string, TensorInfo> tensors_;
    std::map<std::string, std::string> metadata_;
    std::vector<std::unique_ptr<uint8_t[]>> aligned_copies_;
};

// All tensors of a checkpoint directory: model.safetensors, or the shards named by
// model.safetensors.index.json (shard names with '/' or '..' are rejected; total_size is
// not trusted; every shard in the weight map must hold the tensors mapped to it).
class TensorStore {
public:
    static std::unique_ptr<TensorStore> open_dir(const std::string& dir);

    // nullptr when absent.
    const TensorInfo* find(const std::string& name) const;
    // The tensor, checked to exist with exactly `shape`; otherwise PYR_ERR_FORMAT naming the
    // tensor, the file and both shapes.
    const TensorInfo& require(const std::string& name, const std::vector<int64_t>& shape) const;
    uint64_t total_bytes() const;

private:
    void open_sharded(const std::string& index_path);
    void add_file(std::unique_ptr<SafetensorsFile> file);

    std::string dir_;
    std::vector<std::unique_ptr<SafetensorsFile>> files_;
    std::map<std::string, const TensorInfo*> index_;
};

}  // namespace pyr
