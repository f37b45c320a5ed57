// Tokenizer: a thin wrapper over libsentencepiece plus a per-id table of the bytes each
// token stands for, which the stream decoder needs (SentencePiece only decodes sequences).
#include "tokenizer/tokenizer.h"

#include <sentencepiece_processor.h>

#include <filesystem>
#include <fstream>
#include <iterator>

#include "common/error.h"

namespace pyr {

namespace {

enum class PieceKind : uint8_t { Normal, Control, Unknown, Byte };

std::string read_file(const std::string& path) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec))
        fail(PYR_ERR_IO, path + ": is a directory, expected a tokenizer.model file");
    std::ifstream in(path, std::ios::binary);
    if (!in)
        fail(PYR_ERR_IO, path + ": cannot open the tokenizer model (missing or unreadable)");
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad())
        fail(PYR_ERR_IO, path + ": read error");
    return bytes;
}

// "<0xAB>" -> 0xAB; -1 if the piece is not spelled that way.
int parse_byte_piece(const std::string& piece) {
    if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>')
        return -1;
    int value = 0;
    for (size_t i = 3; i < 5; ++i) {
        const char c = piece[i];
        int digit = -1;
        if (c >= '0' && c <= '9') digit = c - '0';
        if (c >= 'A' && c <= 'F') digit = c - 'A' + 10;
        if (c >= 'a' && c <= 'f') digit = c - 'a' + 10;
        if (digit < 0)
            return -1;
        value = value * 16 + digit;
    }
    return value;
}

// SentencePiece's whitespace marker U+2581 '▁' (3 bytes in UTF-8) -> ' '.
std::string replace_space_marker(const std::string& piece) {
    static const std::string marker = "\xE2\x96\x81";
    std::string out;
    out.reserve(piece.size());
    for (size_t i = 0; i < piece.size();) {
        if (piece.compare(i, marker.size(), marker) == 0) {
            out += ' ';
            i += marker.size();
        } else {
            out += piece[i++];
        }
    }
    return out;
}

}  // namespace

struct Tokenizer::Impl {
    sentencepiece::SentencePieceProcessor sp;
    std::vector<std::string> bytes;  // (n_vocab) token_bytes
    std::vector<PieceKind> kinds;    // (n_vocab)

    void check_id(int32_t id) const {
        if (id < 0 || static_cast<size_t>(id) >= bytes.size())
            fail(PYR_ERR_INVALID_ARGUMENT, "token id " + std::to_string(id) +
                                               " is outside the vocabulary [0, " +
                                               std::to_string(bytes.size()) + ")");
    }
    void build_tables(const std::string& path);
};

void Tokenizer::Impl::build_tables(const std::string& path) {
    const int n = sp.GetPieceSize();
    bytes.resize(n);
    kinds.resize(n);
    for (int id = 0; id < n; ++id) {
        if (sp.IsControl(id)) {
            kinds[id] = PieceKind::Control;  // bytes stay ""
        } else if (sp.IsUnknown(id)) {
            // The surface is a trainer option (default " ⁇ "): ask the decoder for it.
            kinds[id] = PieceKind::Unknown;
            bytes[id] = sp.DecodeIds({id});
        } else if (sp.IsByte(id)) {
            const int value = parse_byte_piece(sp.IdToPiece(id));
            if (value < 0)
                fail(PYR_ERR_FORMAT, path + ": byte piece " + std::to_string(id) + " '" +
                                         sp.IdToPiece(id) + "' is not of the form <0xAB>");
            kinds[id] = PieceKind::Byte;
            bytes[id] = std::string(1, static_cast<char>(value));
        } else {
            kinds[id] = PieceKind::Normal;
            bytes[id] = replace_space_marker(sp.IdToPiece(id));
        }
    }
}

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& path) {
    const std::string serialized = read_file(path);
    std::unique_ptr<Tokenizer> tok(new Tokenizer());
    Impl& impl = *tok->impl_;
    const auto status = impl.sp.LoadFromSerializedProto(serialized);
    if (!status.ok())
        fail(PYR_ERR_FORMAT, path + ": not a valid SentencePiece model (" +
                                 status.ToString() + ")");
    if (impl.sp.GetPieceSize() <= 0)
        fail(PYR_ERR_FORMAT, path + ": the SentencePiece model has an empty vocabulary");
    if (impl.sp.bos_id() < 0 || impl.sp.eos_id() < 0)
        fail(PYR_ERR_FORMAT, path + ": the SentencePiece model defines no BOS or no EOS "
                                    "(bos_id " + std::to_string(impl.sp.bos_id()) +
                                    ", eos_id " + std::to_string(impl.sp.eos_id()) + ")");
    impl.build_tables(path);
    return tok;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos) const {
    // SentencePiece matches only normal and user-defined pieces in raw text, so "<s>" is
    // spelled with ordinary pieces; invalid UTF-8 bytes each become U+FFFD (byte pieces
    // EF BF BD) during normalisation.
    std::vector<int> ids;
    const auto status = impl_->sp.Encode(text, &ids);
    if (!status.ok())
        fail(PYR_ERR_INTERNAL, "SentencePiece encode failed: " + status.ToString());
    std::vector<int32_t> out;
    out.reserve(ids.size() + 1);
    if (add_bos)
        out.push_back(bos_id());
    out.insert(out.end(), ids.begin(), ids.end());
    return out;
}

int32_t Tokenizer::n_vocab() const { return static_cast<int32_t>(impl_->bytes.size()); }
int32_t Tokenizer::bos_id() const { return impl_->sp.bos_id(); }
int32_t Tokenizer::eos_id() const { return impl_->sp.eos_id(); }

bool Tokenizer::is_control(int32_t id) const {
    impl_->check_id(id);
    return impl_->kinds[id] == PieceKind::Control;
}

bool Tokenizer::is_normal_piece(int32_t id) const {
    impl_->check_id(id);
    return impl_->kinds[id] == PieceKind::Normal;
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
    impl_->check_id(id);
    return impl_->bytes[id];
}

}  // namespace pyr
