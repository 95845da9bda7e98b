package peft

import (
	"io"

	"github.com/gomlx/gomlx/pkg/core/tensors"
)

// Batch is one step's worth of data: the model's inputs and the loss's labels.
type Batch struct {
	Inputs []*tensors.Tensor
	Labels []*tensors.Tensor
}

// Dataset is an in-memory dataset of batches that implements GoMLX's train.Dataset. With Loop it
// cycles forever (for training by steps); without, it ends each pass with io.EOF (for
// evaluation). Its tensors are reused across passes, never finalized by the trainer.
type Dataset struct {
	name    string
	batches []Batch
	loop    bool
	next    int
}

// NewDataset returns a dataset over batches.
func NewDataset(name string, batches []Batch, loop bool) *Dataset {
	return &Dataset{name: name, batches: batches, loop: loop}
}

// Name implements train.Dataset.
func (d *Dataset) Name() string { return d.name }

// Reset implements train.Dataset: the next Yield returns the first batch.
func (d *Dataset) Reset() { d.next = 0 }

// Yield implements train.Dataset.
func (d *Dataset) Yield() (spec any, inputs, labels []*tensors.Tensor, err error) {
	if d.next >= len(d.batches) {
		if !d.loop || len(d.batches) == 0 {
			return nil, nil, nil, io.EOF
		}
		d.next = 0
	}
	b := d.batches[d.next]
	d.next++
	return nil, b.Inputs, b.Labels, nil
}

// IsOwnershipTransferred tells GoMLX's training loop not to free the yielded tensors: they are
// reused in every pass. It implements train.DatasetCustomOwnership.
func (d *Dataset) IsOwnershipTransferred() bool { return false }

// Len is the number of batches in one pass.
func (d *Dataset) Len() int { return len(d.batches) }
