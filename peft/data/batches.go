package data

import (
	"fmt"
	"math/rand/v2"

	"github.com/gomlx/gomlx/pkg/core/tensors"

	"peft/peft"
)

// Loader cuts examples into batches of rows [Batch, SeqLen], in a shuffled order that is a
// function of the seed and the batch's index alone: batch i of a run is the same in any process,
// which is what lets a checkpointed run resume exactly (Stream.Seek).
//
// The examples are taken as an endless sequence of epochs, each a permutation of all the
// examples (the identity when Shuffle is off); batch i holds rows i·Batch … (i+1)·Batch−1 of that
// sequence, so no example is dropped and an epoch's tail continues into the next. Without
// Pack a row is one example, right-padded with PadID; with Pack, examples in epoch order are
// laid end to end in rows, an example that does not fit in what is left of a row starting the
// next one. Packed examples attend to the ones before them in their row (the decoder has no
// per-example attention mask), and their positions run on; the loss never crosses from one
// example into the next.
type Loader struct {
	Examples []Example
	// Batch is the rows per batch, SeqLen the tokens per row.
	Batch, SeqLen int
	// Shuffle permutes each epoch with Seed.
	Shuffle bool
	Seed    uint64
	// Pack lays several examples in a row.
	Pack bool
	// PadID fills the rows past their examples (its mask is 0; any id works).
	PadID int32

	epochs [][]row // the rows of each epoch built so far
}

// row is the examples laid in one row, by index.
type row []int

// Validate checks the loader's settings and examples.
func (l *Loader) Validate() error {
	if l.Batch <= 0 || l.SeqLen < 2 {
		return fmt.Errorf("data.Loader: Batch (%d) must be > 0 and SeqLen (%d) ≥ 2", l.Batch, l.SeqLen)
	}
	if len(l.Examples) == 0 {
		return fmt.Errorf("data.Loader: no examples")
	}
	for i, ex := range l.Examples {
		if len(ex.IDs) > l.SeqLen || len(ex.Loss) != len(ex.IDs) {
			return fmt.Errorf("data.Loader: example %d (line %d) has %d ids and %d loss flags for rows of %d", i, ex.Line, len(ex.IDs), len(ex.Loss), l.SeqLen)
		}
	}
	return nil
}

// epoch returns the rows of epoch e.
func (l *Loader) epoch(e int) []row {
	for len(l.epochs) <= e {
		k := len(l.epochs)
		order := make([]int, len(l.Examples))
		for i := range order {
			order[i] = i
		}
		if l.Shuffle {
			rng := rand.New(rand.NewPCG(l.Seed, uint64(k)))
			for i := len(order) - 1; i > 0; i-- { // Fisher–Yates, written out so the order never depends on the library's
				j := int(rng.Uint64() % uint64(i+1))
				order[i], order[j] = order[j], order[i]
			}
		}
		var rows []row
		used := l.SeqLen
		for _, idx := range order {
			n := len(l.Examples[idx].IDs)
			if !l.Pack || used+n > l.SeqLen {
				rows = append(rows, nil)
				used = 0
			}
			rows[len(rows)-1] = append(rows[len(rows)-1], idx)
			used += n
		}
		l.epochs = append(l.epochs, rows)
	}
	return l.epochs[e]
}

// rowAt returns row r of the endless sequence of epochs.
func (l *Loader) rowAt(r int) row {
	for e := 0; ; e++ {
		rows := l.epoch(e)
		if r < len(rows) {
			return rows[r]
		}
		r -= len(rows)
	}
}

// RowsPerEpoch is the number of rows in the first epoch (with Pack it may vary by epoch).
func (l *Loader) RowsPerEpoch() int { return len(l.epoch(0)) }

// BatchAt returns batch i: inputs [ids, mask] and labels [ids, mask, loss], each [Batch, SeqLen]
// int32, for llama.CausalLM and peft.NextTokenLoss.
func (l *Loader) BatchAt(i int) peft.Batch {
	rows := make([]row, l.Batch)
	for k := range rows {
		rows[k] = l.rowAt(i*l.Batch + k)
	}
	return l.batch(rows)
}

// batch lays out rows.
func (l *Loader) batch(rows []row) peft.Batch {
	n := len(rows) * l.SeqLen
	ids, mask, loss := make([]int32, n), make([]int32, n), make([]int32, n)
	for r, examples := range rows {
		at := r * l.SeqLen
		for _, idx := range examples {
			ex := l.Examples[idx]
			for k, id := range ex.IDs {
				ids[at+k], mask[at+k] = id, 1
				if ex.Loss[k] {
					loss[at+k] = 1
				}
			}
			at += len(ex.IDs)
		}
		for ; at < (r+1)*l.SeqLen; at++ {
			ids[at] = l.PadID
		}
	}
	t := func(v []int32) *tensors.Tensor { return tensors.FromFlatDataAndDimensions(v, len(rows), l.SeqLen) }
	idsT, maskT := t(ids), t(mask)
	return peft.Batch{Inputs: []*tensors.Tensor{idsT, maskT}, Labels: []*tensors.Tensor{idsT, maskT, t(loss)}}
}

// Pass returns every row once, in file order and unshuffled, as batches (the last one filled
// with empty rows, whose mask is 0): a validation set.
func (l *Loader) Pass() []peft.Batch {
	saved := l.Shuffle
	l.Shuffle, l.epochs = false, nil
	rows := l.epoch(0)
	l.Shuffle, l.epochs = saved, nil
	var out []peft.Batch
	for start := 0; start < len(rows); start += l.Batch {
		chunk := make([]row, l.Batch)
		copy(chunk, rows[start:min(start+l.Batch, len(rows))])
		out = append(out, l.batch(chunk))
	}
	return out
}

// Stream is a Loader as a GoMLX train.Dataset that yields batch after batch without end, from
// the position Seek sets.
type Stream struct {
	loader *Loader
	name   string
	next   int
}

// NewStream returns a stream over l's batches from batch 0.
func NewStream(name string, l *Loader) (*Stream, error) {
	if err := l.Validate(); err != nil {
		return nil, err
	}
	return &Stream{loader: l, name: name}, nil
}

// Seek makes batch i the next one yielded.
func (s *Stream) Seek(i int) { s.next = i }

// Position is the index of the next batch.
func (s *Stream) Position() int { return s.next }

// Name implements train.Dataset.
func (s *Stream) Name() string { return s.name }

// Reset implements train.Dataset; a stream has no end to reset from, so it keeps its position.
func (s *Stream) Reset() {}

// Yield implements train.Dataset.
func (s *Stream) Yield() (spec any, inputs, labels []*tensors.Tensor, err error) {
	b := s.loader.BatchAt(s.next)
	s.next++
	return nil, b.Inputs, b.Labels, nil
}
