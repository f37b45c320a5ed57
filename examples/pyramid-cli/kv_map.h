// kv_map.h — the --kv-map picture: which prompt positions each layer keeps right after
// prefill, as a standalone SVG (a row per layer, a column per prompt position).
#ifndef PYRAMID_CLI_KV_MAP_H
#define PYRAMID_CLI_KV_MAP_H

#include <cstdint>
#include <string>
#include <vector>

struct KvMap {
    std::string policy;                           // for the title
    std::string params;                           // subtitle, e.g. "rho 0.62, gamma 1, W 205"
    int32_t prompt_len = 0;                       // P: columns 0..P-1
    std::vector<std::vector<int32_t>> positions;  // per layer, kept positions (ascending)
};

// The whole SVG document. At most about 1600 px wide for any P: for large P the columns
// become sub-pixel and a layer's density reads as shades of the "kept" colour.
std::string render_kv_map_svg(const KvMap& map);

#endif  // PYRAMID_CLI_KV_MAP_H
