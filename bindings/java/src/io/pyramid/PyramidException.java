package io.pyramid;

/**
 * A call into the library failed: {@link #status()} says how, {@link #message()} is the
 * library's own message (pyr_engine_errmsg / pyr_session_errmsg). Unchecked, so that it can
 * leave an Iterator. CANCELLED is reported this way too, after {@link Session#cancel()}.
 */
public class PyramidException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    private final Status status;
    private final String message;

    public PyramidException(Status status, String message) {
        super(message + " [" + Capi.pyr_status_str(status) + "]");
        this.status = status;
        this.message = message;
    }

    public Status status() {
        return status;
    }

    /** The library's message, without the status. */
    public String message() {
        return message;
    }

    static PyramidException closed(String what) {
        return new PyramidException(Status.ERR_STATE, "the " + what + " is closed");
    }
}
