"""SASRec (Kang & McAuley, 2018) as a plug-in: the baseline of every table and the joint methods' teacher."""
