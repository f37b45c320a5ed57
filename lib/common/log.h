// Process-wide logging behind pyr_log_set_level / pyr_log_set_callback.
#pragma once

#include <string>

#include "pyramid.h"

namespace pyr {

void log_set_level(pyr_log_level level);
void log_set_callback(pyr_log_callback callback, void* user_data);
bool log_enabled(pyr_log_level level);
void log_message(pyr_log_level level, const std::string& message);

#define PYR_LOG(level, expr)                                   \
    do {                                                       \
        if (::pyr::log_enabled(level)) ::pyr::log_message(level, (expr)); \
    } while (0)
#define PYR_LOG_INFO(expr) PYR_LOG(PYR_LOG_INFO, expr)
#define PYR_LOG_WARN(expr) PYR_LOG(PYR_LOG_WARN, expr)
#define PYR_LOG_DEBUG(expr) PYR_LOG(PYR_LOG_DEBUG, expr)

}  // namespace pyr
