package generate

import (
	"errors"
	"fmt"
	"strings"

	"github.com/gomlx/gomlx/pkg/core/tensors"

	"peft/peft"
	"peft/peft/llama"
)

// GenerateBatch continues several prompts at once, prompts[i] with cfgs[i] (each as Generate
// takes them: its own MaxNewTokens, sampling, Seed, StopIDs and OnToken), and returns each row's
// new ids. Row i's ids are those of Generate(m, prompts[i], cfgs[i]) alone (see the package
// documentation, Batches): the rows only share the model's passes.
//
// A row that fails (an invalid configuration or prompt, non-finite logits) ends alone with a nil
// result; the others go on. The error is then a *BatchError holding one error per row. A nil
// model or len(prompts) ≠ len(cfgs) is a plain error and nothing runs.
func GenerateBatch(m *peft.Model, prompts [][]int, cfgs []Config) ([][]int, error) {
	if m == nil {
		return nil, errors.New("generate: nil model")
	}
	return GenerateBatchVia(m, m.CallFn, prompts, cfgs)
}

// CallFunc runs a model function over a model's variables with its method active, as
// peft.Model.CallFn does: what the cached passes of a batch go through.
type CallFunc func(key string, fn peft.ModelFn, inputs ...*tensors.Tensor) ([]*tensors.Tensor, error)

// GenerateBatchVia is GenerateBatch with the cached passes run through call instead of
// m.CallFn: for models that take more per call than the ids, such as lora/multi's, whose call
// names each row's adapter (m, its peft.Model, still gives the layout and configuration).
// Rows that fall back to the cache-free path run through m.Call.
func GenerateBatchVia(m *peft.Model, call CallFunc, prompts [][]int, cfgs []Config) ([][]int, error) {
	if m == nil || call == nil {
		return nil, errors.New("generate: nil model or call function")
	}
	if len(prompts) != len(cfgs) {
		return nil, fmt.Errorf("generate: %d prompts and %d configurations: give one configuration per prompt", len(prompts), len(cfgs))
	}
	out := make([][]int, len(prompts))
	errs := make([]error, len(prompts))
	llamaCfg, cacheOK := cachedConfig(m)
	var rows []*row
	var index []int // rows[j] is prompts[index[j]]
	room := 0
	for i, prompt := range prompts {
		if !cacheOK || cfgs[i].NoCache {
			out[i], errs[i] = Generate(m, prompt, cfgs[i])
			continue
		}
		r, err := newRow(m, prompt, cfgs[i])
		if err != nil {
			errs[i] = err
			continue
		}
		rows, index = append(rows, r), append(index, i)
		room = max(room, r.length)
	}
	if len(rows) > 0 {
		generateCached(call, llamaCfg, rows, room)
	}
	for j, r := range rows {
		if errs[index[j]] = r.err; r.err == nil {
			out[index[j]] = r.generated
		}
	}
	for _, err := range errs {
		if err != nil {
			return out, &BatchError{Rows: errs}
		}
	}
	return out, nil
}

// BatchError is GenerateBatch's error when some of its rows failed.
type BatchError struct {
	// Rows holds one error per row of the batch: nil for a row that ended normally.
	Rows []error
}

// Error lists the failed rows with their errors.
func (e *BatchError) Error() string {
	var failed []string
	for i, err := range e.Rows {
		if err != nil {
			failed = append(failed, fmt.Sprintf("row %d: %v", i, err))
		}
	}
	return fmt.Sprintf("generate: %d of %d rows failed: %s", len(failed), len(e.Rows), strings.Join(failed, "; "))
}

// Unwrap returns the rows' errors, for errors.Is and errors.As.
func (e *BatchError) Unwrap() []error {
	var errs []error
	for _, err := range e.Rows {
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// generateCached generates every row with the key/value cache of a Llama-family model, all rows
// in one batch with a cache of room positions (at least each row's prompt plus MaxNewTokens): the
// prompts left-padded to the longest and padded after it to a multiple of bufferMultiple for the
// prefill, then one id per row per step until every row has ended. A row that has ended keeps
// feeding its last id, whose logits are not read. Each row's ids and error go into the row.
//
// Each executor (CallFn key) is for one input shape, so that no executor outgrows GoMLX's limit
// of graphs per executor however many lengths a process generates.
func generateCached(call CallFunc, cfg llama.Config, rows []*row, room int) {
	batch, width := len(rows), 0
	for _, r := range rows {
		width = max(width, len(r.prompt))
	}
	seq := bufferLength(width, room)
	ids := make([]int32, batch*seq)
	pad := make([]int32, batch)
	for b, r := range rows {
		pad[b] = int32(width - len(r.prompt))
		for i, id := range r.prompt {
			ids[b*seq+int(pad[b])+i] = int32(id)
		}
	}
	padding := tensors.FromFlatDataAndDimensions(pad, batch)
	var keys, values *tensors.Tensor // the cache after the last call
	defer func() { finalize([]*tensors.Tensor{padding, keys, values}) }()
	fail := func(err error) {
		for _, r := range rows {
			if !r.done {
				r.err, r.done = err, true
			}
		}
	}
	next := make([]int32, batch)
	var logits []float32
	for step := 0; ; step++ {
		var outputs []*tensors.Tensor
		var err error
		length, pos := 1, 0
		if step == 0 {
			length, pos = seq, width-1
			outputs, err = call(fmt.Sprintf("generate.prefill/%d/%d/%d", batch, room, seq), llama.CausalLMPrefill(cfg, room),
				tensors.FromFlatDataAndDimensions(ids, batch, seq), padding)
		} else {
			outputs, err = call(fmt.Sprintf("generate.step/%d/%d", batch, room), llama.CausalLMStep(cfg),
				tensors.FromFlatDataAndDimensions(next, batch, 1), tensors.FromScalar(int32(width+step-1)), keys, values, padding)
		}
		if err != nil {
			fail(fmt.Errorf("generate: running the cached model on [%d, %d] ids (step %d): %w", batch, length, step, err))
			return
		}
		if len(outputs) != 3 {
			finalize(outputs)
			fail(fmt.Errorf("generate: the cached model returned %d outputs, want logits, keys and values", len(outputs)))
			return
		}
		finalize([]*tensors.Tensor{keys, values})
		keys, values = outputs[1], outputs[2]
		active := false
		for b, r := range rows {
			if r.done {
				continue
			}
			logits, err = readRow(outputs[0], batch, length, b, pos, logits)
			if err != nil {
				finalize(outputs[:1])
				fail(err)
				return
			}
			id, more, err := r.choose(step, logits)
			if err != nil {
				r.err, r.done = err, true
				continue
			}
			next[b], r.done = int32(id), !more
			active = active || more
		}
		finalize(outputs[:1])
		if !active {
			return
		}
	}
}
