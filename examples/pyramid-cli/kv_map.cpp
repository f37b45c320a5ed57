// kv_map.cpp — SVG rendering of the per-layer kept positions (see kv_map.h).
#include "kv_map.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace {

const char* const kKeptColor = "#1f5fa8";
const char* const kDroppedColor = "#e3e8ef";
const char* const kTextColor = "#222";
const char* const kMutedColor = "#666";

// Geometry of the picture, derived from P and the layer count.
struct Layout {
    double left = 70, right = 120, top = 92, bottom = 58;
    double cell_w = 0, row_h = 0, row_gap = 0;
    double grid_w = 0, grid_h = 0, width = 0, height = 0;
    int label_every = 1;  // label every k-th layer when rows are too thin for text
};

std::string esc(const std::string& s) {
    std::string out;
    for (char c : s) {
        switch (c) {
            case '&': out += "&amp;"; break;
            case '<': out += "&lt;"; break;
            case '>': out += "&gt;"; break;
            case '"': out += "&quot;"; break;
            default: out += c;
        }
    }
    return out;
}

std::string num(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f", v);
    std::string s = buf;  // trim trailing zeros so coordinates stay short
    while (s.size() > 1 && s.back() == '0') s.pop_back();
    if (s.back() == '.') s.pop_back();
    return s;
}

// Rough text width for a sans-serif font, to keep the title inside the picture.
double text_width(const std::string& s, double font_px) { return 0.58 * font_px * double(s.size()); }

Layout make_layout(const KvMap& m, const std::string& title) {
    Layout g;
    const double max_width = 1600;
    int32_t n_layers = int32_t(m.positions.size());
    g.cell_w = std::min(24.0, (max_width - g.left - g.right) / double(std::max(m.prompt_len, 1)));
    g.row_h = std::clamp(std::floor(440.0 / std::max(n_layers, 1)), 6.0, 26.0);
    g.row_gap = g.row_h >= 12 ? 3 : 1;
    g.grid_w = g.cell_w * m.prompt_len;
    g.grid_h = n_layers * (g.row_h + g.row_gap) - g.row_gap;
    g.label_every = int(std::ceil(11.0 / (g.row_h + g.row_gap)));
    double text_need = std::max(text_width(title, 17), text_width(m.params, 12)) + 40;
    g.width = std::ceil(std::max({g.left + g.grid_w + g.right, text_need, 520.0}));
    g.height = std::ceil(g.top + g.grid_h + g.bottom);
    return g;
}

// A "nice" tick step (1, 2 or 5 times a power of ten) giving at most about 8 intervals.
int32_t tick_step(int32_t p) {
    double raw = std::max(1.0, double(p) / 8.0);
    double mag = std::pow(10.0, std::floor(std::log10(raw)));
    for (double f : {1.0, 2.0, 5.0, 10.0})
        if (f * mag >= raw) return int32_t(f * mag);
    return int32_t(10 * mag);
}

void draw_header(std::ostringstream& o, const Layout& g, const std::string& title,
                 const std::string& params) {
    o << "<text x=\"20\" y=\"30\" font-size=\"17\" font-weight=\"bold\" fill=\"" << kTextColor
      << "\">" << esc(title) << "</text>\n";
    if (!params.empty())
        o << "<text x=\"20\" y=\"50\" font-size=\"12\" fill=\"" << kMutedColor << "\">"
          << esc(params) << "</text>\n";
    // Legend under the subtitle, left-aligned with the grid.
    double y = 64, x = g.left;
    o << "<g class=\"legend\" font-size=\"12\" fill=\"" << kTextColor << "\">"
      << "<rect x=\"" << num(x) << "\" y=\"" << num(y) << "\" width=\"12\" height=\"12\" fill=\""
      << kKeptColor << "\"/><text x=\"" << num(x + 17) << "\" y=\"" << num(y + 10)
      << "\">kept in the layer's cache</text>"
      << "<rect x=\"" << num(x + 190) << "\" y=\"" << num(y) << "\" width=\"12\" height=\"12\" fill=\""
      << kDroppedColor << "\" stroke=\"#c5ccd6\" stroke-width=\"0.5\"/><text x=\"" << num(x + 207)
      << "\" y=\"" << num(y + 10) << "\">dropped</text></g>\n";
    o << "<text x=\"" << num(g.left + g.grid_w + 8) << "\" y=\"" << num(g.top - 6)
      << "\" font-size=\"11\" fill=\"" << kMutedColor << "\">kept</text>\n";
}

// One layer's row: wide cells are drawn one by one with a small gap so single positions
// can be told apart; thin ones as a light band with dark runs of consecutive kept positions,
// at least 1 px wide so that a lone kept token (a passkey line, say) stays visible.
void draw_row(std::ostringstream& o, const Layout& g, const KvMap& m, int32_t layer) {
    const std::vector<int32_t>& pos = m.positions[size_t(layer)];
    double y = g.top + layer * (g.row_h + g.row_gap);
    std::vector<char> kept(size_t(std::max(m.prompt_len, 0)), 0);
    int32_t n_kept = 0;
    for (int32_t p : pos) {
        if (p < 0 || p >= m.prompt_len || kept[size_t(p)]) continue;  // not a prompt position
        kept[size_t(p)] = 1;
        ++n_kept;
    }

    o << "<g class=\"layer\" id=\"layer-" << layer << "\">";
    if (g.cell_w >= 4) {
        double gap = g.cell_w >= 8 ? 1.0 : 0.5;
        for (int32_t p = 0; p < m.prompt_len; ++p)
            o << "<rect x=\"" << num(g.left + p * g.cell_w) << "\" y=\"" << num(y) << "\" width=\""
              << num(g.cell_w - gap) << "\" height=\"" << num(g.row_h) << "\" fill=\""
              << (kept[size_t(p)] ? kKeptColor : kDroppedColor) << "\"/>";
    } else {
        o << "<rect x=\"" << num(g.left) << "\" y=\"" << num(y) << "\" width=\"" << num(g.grid_w)
          << "\" height=\"" << num(g.row_h) << "\" fill=\"" << kDroppedColor << "\"/>";
        for (int32_t p = 0; p < m.prompt_len;) {
            if (!kept[size_t(p)]) { ++p; continue; }
            int32_t q = p;
            while (q < m.prompt_len && kept[size_t(q)]) ++q;
            o << "<rect x=\"" << num(g.left + p * g.cell_w) << "\" y=\"" << num(y) << "\" width=\""
              << num(std::max((q - p) * g.cell_w, 1.0)) << "\" height=\"" << num(g.row_h) << "\" fill=\""
              << kKeptColor << "\"/>";
            p = q;
        }
    }
    double cy = y + g.row_h / 2;
    double font = std::min(12.0, std::max(8.0, g.row_h - 2));
    if (layer % g.label_every == 0)
        o << "<text x=\"" << num(g.left - 8) << "\" y=\"" << num(cy) << "\" dy=\"0.35em\" font-size=\""
          << num(font) << "\" text-anchor=\"end\" fill=\"" << kTextColor << "\">" << layer << "</text>";
    if (layer % g.label_every == 0 && m.prompt_len > 0) {
        char share[64];
        std::snprintf(share, sizeof share, "%d (%.0f%%)", n_kept, 100.0 * n_kept / m.prompt_len);
        o << "<text x=\"" << num(g.left + g.grid_w + 8) << "\" y=\"" << num(cy)
          << "\" dy=\"0.35em\" font-size=\"" << num(font) << "\" fill=\"" << kMutedColor << "\">"
          << share << "</text>";
    }
    o << "</g>\n";
}

void draw_axes(std::ostringstream& o, const Layout& g, int32_t prompt_len) {
    double y0 = g.top + g.grid_h;
    o << "<g class=\"x-axis\" font-size=\"11\" fill=\"" << kTextColor << "\" stroke=\"none\">";
    o << "<line x1=\"" << num(g.left) << "\" y1=\"" << num(y0 + 2) << "\" x2=\""
      << num(g.left + g.grid_w) << "\" y2=\"" << num(y0 + 2) << "\" stroke=\"#999\"/>";
    for (int32_t p = 0, step = tick_step(prompt_len); p < prompt_len; p += step) {
        double x = g.left + (p + 0.5) * g.cell_w;
        o << "<line x1=\"" << num(x) << "\" y1=\"" << num(y0 + 2) << "\" x2=\"" << num(x)
          << "\" y2=\"" << num(y0 + 7) << "\" stroke=\"#999\"/><text x=\"" << num(x) << "\" y=\""
          << num(y0 + 19) << "\" text-anchor=\"middle\">" << p << "</text>";
    }
    o << "<text x=\"" << num(g.left + g.grid_w / 2) << "\" y=\"" << num(y0 + 40)
      << "\" text-anchor=\"middle\" font-size=\"12\">prompt position (original token index, "
      << "0 = BOS)</text></g>\n";
    double cy = g.top + g.grid_h / 2;
    o << "<text x=\"18\" y=\"" << num(cy) << "\" font-size=\"12\" fill=\"" << kTextColor
      << "\" text-anchor=\"middle\" transform=\"rotate(-90 18 " << num(cy) << ")\">layer</text>\n";
}

}  // namespace

std::string render_kv_map_svg(const KvMap& m) {
    size_t total = 0;
    for (const auto& layer : m.positions) total += layer.size();
    double cells = double(m.positions.size()) * std::max(m.prompt_len, 1);
    char title[256];
    std::snprintf(title, sizeof title, "KV cache after prefill: %s, P = %d, mean retention %.3f",
                  m.policy.c_str(), m.prompt_len, cells > 0 ? double(total) / cells : 0.0);
    Layout g = make_layout(m, title);

    std::ostringstream o;
    o << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      << "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"" << num(g.width)
      << "\" height=\"" << num(g.height) << "\" viewBox=\"0 0 " << num(g.width) << " "
      << num(g.height) << "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""
      << (g.cell_w >= 2 ? " shape-rendering=\"crispEdges\"" : "") << ">\n"
      << "<title>" << esc(title) << "</title>\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    draw_header(o, g, title, m.params);
    for (int32_t il = 0; il < int32_t(m.positions.size()); ++il) draw_row(o, g, m, il);
    draw_axes(o, g, m.prompt_len);
    o << "</svg>\n";
    return o.str();
}
