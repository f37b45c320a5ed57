#include "common/log.h"

#include <atomic>
#include <cstdio>
#include <mutex>

namespace pyr {
namespace {

std::atomic<int> g_level{PYR_LOG_WARN};
// guards the callback and serialises its calls; recursive, so that a callback may call the
// library (set another callback, or make a call that logs) on its own thread
std::recursive_mutex g_mutex;
pyr_log_callback g_callback = nullptr;
void* g_user_data = nullptr;

const char* level_name(pyr_log_level level) {
    switch (level) {
        case PYR_LOG_DEBUG: return "debug";
        case PYR_LOG_INFO: return "info";
        case PYR_LOG_WARN: return "warning";
        case PYR_LOG_ERROR: return "error";
        default: return "";
    }
}

}  // namespace

void log_set_level(pyr_log_level level) { g_level.store(int(level)); }

void log_set_callback(pyr_log_callback callback, void* user_data) {
    std::lock_guard<std::recursive_mutex> lock(g_mutex);
    g_callback = callback;
    g_user_data = user_data;
}

bool log_enabled(pyr_log_level level) {
    return level != PYR_LOG_NONE && int(level) >= g_level.load();
}

void log_message(pyr_log_level level, const std::string& message) {
    std::lock_guard<std::recursive_mutex> lock(g_mutex);
    if (g_callback)
        g_callback(level, message.c_str(), g_user_data);
    else
        std::fprintf(stderr, "pyramid %s: %s\n", level_name(level), message.c_str());
}

}  // namespace pyr
