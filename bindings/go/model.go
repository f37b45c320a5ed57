package pyramid

import (
	"fmt"

	"pyramid/internal/capi"
)

// EngineParams is the SWIG proxy of pyr_engine_params, with a setter per field of the
// header's struct (SetDevice, SetNThreads, SetMaxDeviceBytes, SetPrefillChunk). Options
// receive it after pyr_engine_params_init has filled in the defaults.
type EngineParams = capi.EngineParams

// EngineOption sets engine parameters:
//
//	pyramid.Open("", func(p pyramid.EngineParams) { p.SetDevice("cpu") })
type EngineOption func(EngineParams)

// Model is a loaded checkpoint (pyr_engine). Safe for concurrent use. Sessions keep the
// native engine alive, so a Model may be closed before its Sessions.
type Model struct {
	path string
	h    *handle[capi.Struct_SS_pyr_engine]
}

// DefaultModelDir is the bundled demo model's directory (tiny-code-llama).
func DefaultModelDir() string {
	return capi.Pyr_default_model_dir()
}

// Version is the library's "MAJOR.MINOR.PATCH".
func Version() string {
	return capi.Pyr_version_string()
}

// Open loads the HF LLaMA checkpoint in directory path ("" for the bundled model). On
// failure the *Error carries the library's message, e.g. StatusIO naming the file.
func Open(path string, opts ...EngineOption) (*Model, error) {
	if abi := capi.Pyr_abi_version(); abi != capi.PYR_ABI_VERSION {
		return nil, &Error{Status: StatusUnsupported, Message: fmt.Sprintf(
			"the binding was generated for ABI %d but the loaded library has ABI %d (%s)",
			capi.PYR_ABI_VERSION, abi, Version())}
	}
	if path == "" {
		path = DefaultModelDir()
	}
	params := capi.NewEngineParams()
	defer capi.DeleteEngineParams(params)
	capi.Pyr_engine_params_init(params)
	for _, opt := range opts {
		opt(params)
	}
	out := capi.NewEngineOut()
	defer capi.DeleteEngineOut(out)
	status := Status(capi.Pyr_engine_open(path, params, out.Cast()))
	engine := out.Value()
	if status != StatusOK {
		// sqlite3_open style: even a failed open returns a handle carrying the message.
		err := &Error{Status: status, Message: capi.Pyr_engine_errmsg(engine)}
		capi.Pyr_engine_close(engine)
		return nil, err
	}
	return &Model{path: path, h: newHandle(engine, "model", capi.Pyr_engine_close, nil)}, nil
}

// Close releases this reference; open Sessions keep working. Idempotent.
func (m *Model) Close() error {
	m.h.close()
	return nil
}

// Path is the model's directory.
func (m *Model) Path() string {
	return m.path
}

// facts reads model facts; they are zero once the model is closed.
func (m *Model) facts(read func(capi.Struct_SS_pyr_engine)) {
	_ = m.h.quick(read)
}

// NLayers is the number of transformer layers (0 once closed).
func (m *Model) NLayers() (n int) {
	m.facts(func(e capi.Struct_SS_pyr_engine) { n = capi.Pyr_engine_n_layers(e) })
	return n
}

// NVocab is the vocabulary size (0 once closed).
func (m *Model) NVocab() (n int) {
	m.facts(func(e capi.Struct_SS_pyr_engine) { n = capi.Pyr_engine_n_vocab(e) })
	return n
}

// BOS is the beginning-of-sequence token id.
func (m *Model) BOS() (id int) {
	m.facts(func(e capi.Struct_SS_pyr_engine) { id = capi.Pyr_engine_bos_token(e) })
	return id
}

// EOS is the (first) end-of-sequence token id.
func (m *Model) EOS() (id int) {
	m.facts(func(e capi.Struct_SS_pyr_engine) { id = capi.Pyr_engine_eos_token(e) })
	return id
}

// Device is the device the model runs on, e.g. "cpu" ("" once closed).
func (m *Model) Device() (device string) {
	m.facts(func(e capi.Struct_SS_pyr_engine) { device = capi.Pyr_engine_device(e) })
	return device
}

// WeightsBytes is the size of the weights the model holds.
func (m *Model) WeightsBytes() (n uint64) {
	m.facts(func(e capi.Struct_SS_pyr_engine) { n = capi.Pyr_engine_weights_bytes(e) })
	return n
}

// Tokenize returns the token ids of text, with BOS first if addBOS.
func (m *Model) Tokenize(text string, addBOS bool) (ids []int, err error) {
	flag := 0
	if addBOS {
		flag = 1
	}
	err = m.h.use(func(e capi.Struct_SS_pyr_engine) error {
		n := capi.Pyr_engine_tokenize(e, text, flag, nil, 0)
		if n >= 0 {
			buf := capi.NewInt32Array(atLeastOne(n))
			defer capi.DeleteInt32Array(buf)
			n = capi.Pyr_engine_tokenize(e, text, flag, buf.Cast(), n)
			for i := 0; i < n; i++ {
				ids = append(ids, buf.Getitem(i))
			}
		}
		if n < 0 {
			return &Error{Status: Status(n), Message: capi.Pyr_engine_errmsg(e)}
		}
		return nil
	})
	return ids, err
}

// atLeastOne sizes C buffers: calloc(0) may return NULL, which SWIG reports as failure.
func atLeastOne(n int) int {
	if n < 1 {
		return 1
	}
	return n
}
