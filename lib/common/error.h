// Errors inside the engine: every failure is a pyr::Error carrying the pyr_status the C
// shim (lib/api/) returns and a message that names the thing and the problem.
#pragma once

#include <stdexcept>
#include <string>

#include "pyramid.h"

namespace pyr {

class Error : public std::runtime_error {
public:
    Error(pyr_status status, const std::string& message)
        : std::runtime_error(message), status_(status) {}
    pyr_status status() const { return status_; }

private:
    pyr_status status_;
};

[[noreturn]] inline void fail(pyr_status status, const std::string& message) {
    throw Error(status, message);
}

// Checks an internal invariant; a failure is a bug, reported as PYR_ERR_INTERNAL.
#define PYR_ASSERT(cond)                                                                   \
    do {                                                                                   \
        if (!(cond))                                                                       \
            ::pyr::fail(PYR_ERR_INTERNAL, std::string("internal check failed: ") + #cond + \
                                              " at " + __FILE__ + ":" +                    \
                                              std::to_string(__LINE__));                   \
    } while (0)

}  // namespace pyr
